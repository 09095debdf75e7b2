# cython: language_level=3
"""Cython kernels for blockwise quantization, 4-bit packing and dequantization.

Loops only, over typed memoryviews, without the GIL; blocks are split across
threads with ``prange`` when the extension was built with OpenMP. Every
function names the NumPy expression it equals; the tests check the bytes are
the same (``tests/kernels/test_kernels_equal.py``). Arithmetic is float32
throughout and the extension is compiled with ``-ffp-contract=off`` so that
``a * b + c`` is rounded twice, exactly as NumPy (and bitsandbytes) round it.
The inner loops of dequantization are C, chosen at run time for the CPU
(``lookup16.h``); the fused decoding product is ``gemv4.h``.

Inputs are finite (``qlora_ref.validation`` rejects NaN and infinity before
any kernel runs); the kernels rely on it only where noted. Each ``def``
first checks its arguments' lengths (``checks.pxi``, included below); each
memoryview argument is marked ``# in:`` or ``# out:`` with its length.

Compiler directives are set in ``setup.py``, not in this file's header
(which would override them): ``boundscheck=False, wraparound=False,
cdivision=True, initializedcheck=False``, or, with
``QLORA_REF_DEBUG_CYTHON=1``, all four the other way round (:data:`DEBUG_BUILD`
says which). The debug build checks every memoryview index; the C helpers
that loop over raw pointers (``lookup16.h``, ``gemv4.h``, ``_pack_range``, ...)
are covered only by the length checks.

Why the loops are written as they are (counting instead of searching, absmax
on the bits, a 16-entry table per block, raw pointers in the byte loops) and
what they measure: ``docs/benchmarks.md`` (``qlora-ref bench``).
"""
cimport cython
from cython.parallel cimport prange
from libc.stdint cimport int32_t, uint16_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from operator import index as _as_index

ctypedef unsigned char u8

cdef float ONE = 1.0
cdef float TINY = 1e-38   # bitsandbytes clamps absmax to 1e-38 before taking 1 / absmax

cdef enum:
    CHUNK = 32      # values quantized together; even, and divides every valid blocksize
    HALF_CHUNK = 16 # bytes they pack into
    N_MIDS_4BIT = 15
    SPAN = 16384    # bytes per parallel task in pack/unpack
    BLOCKS_PER_TASK = 256     # 4-bit blocks per call of the dequantize loop (and parallel task)
    GEMV_ROWS_PER_TASK = 16   # output rows per parallel task


ctypedef fused out_t:   # dequantized output: float32, or bfloat16 bits
    float
    uint16_t


include "checks.pxi"


cdef extern from *:
    """
    #ifdef QLORA_REF_DEBUG_CYTHON
    static int _debug_build(void) { return 1; }
    #else
    static int _debug_build(void) { return 0; }
    #endif
    #ifdef _OPENMP
    static int _openmp(void) { return 1; }
    #else
    static int _openmp(void) { return 0; }
    #endif
    """
    int _debug_build()
    int _openmp()

#: True if this extension is the debug build (``QLORA_REF_DEBUG_CYTHON=1`` in
#: ``setup.py``): bounds and wraparound checks on, C division off, so an
#: out-of-range memoryview access raises ``IndexError`` instead of reading
#: past the array. The ``.ci/run`` script asserts it before running the
#: kernel tests under that build.
DEBUG_BUILD = bool(_debug_build())


def openmp_enabled():
    """True if this extension was compiled with OpenMP (``prange`` runs in parallel)."""
    return bool(_openmp())


cdef extern from "lookup16.h" nogil:
    # out[2j], out[2j+1] = code[bytes[j] >> 4] * scale, code[bytes[j] & 15] * scale, where
    # scale = scales[j // block_bytes]: a run of blocks, the last one possibly shorter
    void lookup16_f32(const u8* bytes, Py_ssize_t n_bytes, Py_ssize_t block_bytes,
                      const float* scales, const float* code, float* out)
    void lookup16_bf16(const u8* bytes, Py_ssize_t n_bytes, Py_ssize_t block_bytes,
                       const float* scales, const float* code, uint16_t* out)
    # float32 -> bfloat16 bits: nearest even, subnormals to a signed zero, NaN quieted
    uint16_t lookup16_bf16_bits(float v)
    int lookup16_select(int level)
    int lookup16_level()
    int lookup16_best()

cdef extern from "gemv4.h" nogil:
    # y[r, o] = sum_i x[r, i] * code[q(o, i)] * absmax[block of (o, i)]
    void gemv4(const u8* packed, const float* absmax, const float* code, Py_ssize_t blocksize,
               const float* x, const float* xs, Py_ssize_t m, Py_ssize_t in_features,
               Py_ssize_t o_start, Py_ssize_t o_end, float* y, Py_ssize_t out_features)
    # xs: x with each 32 inputs reordered evens-then-odds, what the vector paths read
    int gemv4_wants_split_x(Py_ssize_t blocksize, Py_ssize_t in_features)
    void gemv4_split_x(const float* x, Py_ssize_t m, Py_ssize_t in_features, float* xs)
    enum: GEMV4_MAX_ROWS    # rows of x one pass over the codes takes

#: The inner loop of 4-bit dequantization, by name (lookup16.h): every path writes
#: the same bytes; they differ in how many lookups one instruction does.
#: "avx512bf16" is "avx512" with the bfloat16 rounding done by vcvtneps2bf16.
SIMD_LEVELS = ("portable", "avx2", "avx512", "avx512bf16")


def simd_levels():
    """The paths this CPU and this build can run, slowest first (``"portable"`` always)."""
    return SIMD_LEVELS[:lookup16_best()]


def simd_level():
    """The path the dequantize kernels use now."""
    return SIMD_LEVELS[lookup16_level() - 1]


def set_simd_level(str name):
    """Use path ``name`` (one of :func:`simd_levels`, or ``"auto"`` for the best) from now on."""
    if name != "auto" and name not in simd_levels():
        raise ValueError(f"simd level {name!r} is not available here; choose from "
                         f"{simd_levels() + ('auto',)}")
    lookup16_select(0 if name == "auto" else SIMD_LEVELS.index(name) + 1)
    return simd_level()


lookup16_select(0)  # the best the CPU has, until told otherwise


# -- helpers -----------------------------------------------------------------

cdef inline Py_ssize_t _block_end(Py_ssize_t b, Py_ssize_t blocksize, Py_ssize_t n) noexcept nogil:
    """One past the last index of block ``b``: ``min((b + 1) * blocksize, n)``.

    The last block may be partial (matches bitsandbytes: a trailing partial
    block is its own block, with its own constant).
    """
    cdef Py_ssize_t end = (b + 1) * blocksize
    return n if end > n else end


cdef inline int _count_below(const float* mids, int log2_levels, float v) noexcept nogil:
    """Number of midpoints strictly below ``v`` (= ``searchsorted(mids, v, "left")``).

    Binary search over the 2**log2_levels - 1 sorted midpoints (used for the
    8-bit code of double quantization, on one value per 4-bit block).
    """
    cdef int pos = 0
    cdef int step = 1 << (log2_levels - 1)
    while step > 0:
        if mids[pos + step - 1] < v:
            pos = pos + step
        step = step >> 1
    return pos


cdef inline int _count_below_4bit(const float* mids, float v) noexcept nogil:
    """``#{k : mids[k] < v}`` over the 15 midpoints of a 4-bit code (= ``searchsorted``, left)."""
    cdef int k, below = 0
    for k in range(N_MIDS_4BIT):
        below = below + (mids[k] < v)
    return below


cdef inline float _block_absmax(const float* x, Py_ssize_t length) noexcept nogil:
    """``max(abs(x[:length]))``, computed on the bit patterns so that the loop vectorises.

    With the sign bit cleared, the bits of finite floats (read as int32)
    are ordered as the values are, and the maximum does not depend on the
    order of comparisons: the result equals ``np.abs(x).max()`` bit for bit.
    (A float max reduction is not vectorised without -ffast-math; an
    integer one is, with SSE2 alone.)
    """
    cdef int32_t bits, amax = 0
    cdef float result
    cdef Py_ssize_t i
    for i in range(length):
        memcpy(&bits, &x[i], 4)
        bits = bits & 0x7FFFFFFF                 # |x[i]|
        amax = bits if bits > amax else amax
    memcpy(&result, &amax, 4)
    return result


cdef inline float _reciprocal(float amax) noexcept nogil:
    if amax < TINY:
        amax = TINY
    return ONE / amax


@cython.cdivision(True)     # 1 / 0 is +inf here on purpose, in the debug build too
cdef inline float _reciprocal_unclamped(float amax) noexcept nogil:
    return ONE / amax


cdef inline void _quantize_4bit_chunk(const float* x, float scale, const float* mids,
                                      const u8* pair_order, u8* packed) noexcept nogil:
    """CHUNK values -> CHUNK / 2 bytes of ``pack(order[#{k : mids[k] < x[i] * scale}])``.

    The loops are interchanged (midpoints outside, values inside) so that
    the compare-and-count runs over CHUNK values at once.
    """
    cdef float v[CHUNK]      # x * scale, float32: the same product as blockwise.normalize
    cdef int below[CHUNK]     # sorted index of the nearest code
    cdef u8 pairs[HALF_CHUNK]
    cdef float m
    cdef int i, k
    for i in range(CHUNK):
        v[i] = x[i] * scale
        below[i] = mids[0] < v[i]
    for k in range(1, N_MIDS_4BIT):
        m = mids[k]
        for i in range(CHUNK):
            below[i] = below[i] + (m < v[i])
    for i in range(HALF_CHUNK):
        pairs[i] = (below[2 * i] << 4) | below[2 * i + 1]
    for i in range(HALF_CHUNK):
        packed[i] = pair_order[pairs[i]]


cdef inline void _dequantize_4bit_blocks(const u8* packed, const float* code, const float* scales,
                                         Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t blocksize,
                                         Py_ssize_t n, out_t* out) noexcept nogil:
    """``out[i] = code[q_i] * scales[b - b0]`` for the elements ``i`` of blocks [b0, b1).

    A block has only 16 distinct outputs: they are computed first (the same
    float32 products, so the same roundings), then each element is a lookup,
    two per byte, by the path of ``lookup16.h`` chosen for this CPU. bfloat16
    is rounded by ``lookup16_bf16_bits``: nearest even, a subnormal to a zero of
    its sign (as bitsandbytes' AVX512-BF16 kernel does).
    """
    cdef Py_ssize_t start = b0 * blocksize, end = _block_end(b1 - 1, blocksize, n)
    if out_t is float:
        lookup16_f32(packed + (start >> 1), (end - start) >> 1, blocksize >> 1, scales, code,
                     out + start)
        if (end - start) % 2:  # an odd tail: its value is the high nibble of the last byte
            out[end - 1] = code[packed[(end - 1) >> 1] >> 4] * scales[b1 - 1 - b0]
    else:
        lookup16_bf16(packed + (start >> 1), (end - start) >> 1, blocksize >> 1, scales, code,
                      out + start)
        if (end - start) % 2:
            out[end - 1] = lookup16_bf16_bits(code[packed[(end - 1) >> 1] >> 4]
                                              * scales[b1 - 1 - b0])
    # start even and b0 < b1 <= ceil(n / blocksize): the callers check len(absmax) ==
    # ceil(n / blocksize) and an even blocksize (one constant too many made end - start
    # negative, and the odd-tail line wrote the last output again with that constant)


cdef inline void _dequantize_4bit_nested_blocks(
        const u8* packed, const u8* absmax_codes, const float* nested_absmax,
        const float* nested_code, float offset, Py_ssize_t nested_blocksize, const float* code,
        Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t blocksize, Py_ssize_t n,
        out_t* out) noexcept nogil:
    """:func:`_dequantize_4bit_blocks` with each block's constant double-dequantized first."""
    cdef float scales[BLOCKS_PER_TASK]   # on this thread's stack
    cdef float product
    cdef Py_ssize_t b
    cdef Py_ssize_t nested = b0 // nested_blocksize, seen = b0 % nested_blocksize  # b // nbs
    for b in range(b0, b1):
        product = nested_code[absmax_codes[b]] * nested_absmax[nested]
        scales[b - b0] = product + offset              # rounded after the product and the sum
        seen = seen + 1
        if seen == nested_blocksize:                   # (no division per block)
            nested, seen = nested + 1, 0
    _dequantize_4bit_blocks(packed, code, scales, b0, b1, blocksize, n, out)


# -- quantization --------------------------------------------------------------

def quantize_blockwise(const float[::1] x,           # in: (n,) float32 values
                       const float[::1] midpoints,   # in: (2**log2_levels - 1,) sorted
                       const u8[::1] order,          # in: (2**log2_levels,) sorted -> code index
                       int log2_levels, Py_ssize_t blocksize,
                       u8[::1] codes,                # out: (n,) indices into the code
                       float[::1] absmax,            # out: (ceil(n / blocksize),)
                       int num_threads=1):
    """Blockwise absmax quantization to unpacked codes.

    Equals ``qlora_ref.blockwise.quantize_blockwise(x, code, blocksize)`` with
    ``midpoints, order = decision_boundaries(code)`` and ``len(code) == 2**log2_levels``.
    Like it (and bitsandbytes' 8-bit kernel) the scale is the plain ``1 / absmax``,
    without the 4-bit path's 1e-38 floor, and a value whose ``x * scale`` is NaN
    (``0 * inf``: every value of an all-zero block) gets index 0.
    """
    cdef Py_ssize_t n = x.shape[0]
    cdef Py_ssize_t b, i, end
    cdef float scale, v
    _check_quantize_blockwise(n, midpoints, order, log2_levels, blocksize, codes.shape[0],
                              absmax.shape[0], num_threads)
    for b in prange(absmax.shape[0], nogil=True, num_threads=num_threads, schedule="static"):
        end = _block_end(b, blocksize, n)
        absmax[b] = _block_absmax(&x[b * blocksize], end - b * blocksize)
        scale = _reciprocal_unclamped(absmax[b])   # matches bitsandbytes' 8-bit kernel: no floor
        for i in range(b * blocksize, end):
            v = x[i] * scale
            codes[i] = 0 if v != v else order[_count_below(&midpoints[0], log2_levels, v)]


def quantize_4bit_packed(const float[::1] x,           # in: (n,) float32 values
                         const float[::1] midpoints,   # in: (15,) sorted
                         const u8[::1] order,          # in: (16,) sorted -> code index
                         Py_ssize_t blocksize, pad_code,
                         u8[::1] packed,               # out: (ceil(n / 2),) two codes a byte
                         float[::1] absmax,            # out: (ceil(n / blocksize),)
                         int num_threads=1):
    """Fused 4-bit quantization and packing (``blocksize`` must be even).

    Equals ``pack_nibbles(nearest_code(normalize(x, absmax, blocksize), code),
    pad=pad_code)`` with ``absmax = block_absmax(x, blocksize)`` (the 4-bit path
    of ``qlora_ref.fourbit.quantize_4bit``), and writes that ``absmax`` too;
    like ``pack_nibbles`` it raises ``ValueError`` for a ``pad_code`` outside 0..15.
    """
    cdef Py_ssize_t n = x.shape[0]
    cdef Py_ssize_t b, i, end
    cdef float scale
    cdef u8 high, low
    cdef u8 pad = _checked_pad(pad_code)
    cdef u8 pair_order[256]     # (sorted index pair) -> packed byte of the two codes
    cdef int p
    _check_quantize_4bit(n, midpoints, order, blocksize, packed.shape[0], absmax.shape[0],
                         num_threads)
    for p in range(256):
        pair_order[p] = (order[p >> 4] << 4) | order[p & 15]
    for b in prange(absmax.shape[0], nogil=True, num_threads=num_threads, schedule="static"):
        end = _block_end(b, blocksize, n)
        absmax[b] = _block_absmax(&x[b * blocksize], end - b * blocksize)
        scale = _reciprocal(absmax[b])
        i = b * blocksize
        while i + CHUNK <= end:                       # whole chunks: vectorised
            _quantize_4bit_chunk(&x[i], scale, &midpoints[0], pair_order, &packed[i >> 1])
            i = i + CHUNK
        while i < end:                                # the rest of a partial block
            high = order[_count_below_4bit(&midpoints[0], x[i] * scale)]
            if i + 1 < end:
                low = order[_count_below_4bit(&midpoints[0], x[i + 1] * scale)]
            else:
                low = pad
            packed[i >> 1] = (high << 4) | low
            i = i + 2


# -- dequantization ------------------------------------------------------------

def dequantize_blockwise(const u8[::1] codes,      # in: (n,) indices into code
                         const float[::1] absmax,  # in: (ceil(n / blocksize),)
                         const float[::1] code,    # in: (256,) the 8-bit code table
                         Py_ssize_t blocksize,
                         float[::1] out,           # out: (n,) float32
                         int num_threads=1):
    """Equals ``qlora_ref.blockwise.dequantize_blockwise(codes, absmax, code, blocksize)``.

    ``code`` must have 256 values, so that every uint8 code indexes it.
    """
    cdef Py_ssize_t n = codes.shape[0]
    cdef Py_ssize_t b, i
    cdef float scale
    _check_dequantize_blockwise(n, code, blocksize, out.shape[0], absmax.shape[0], num_threads)
    for b in prange(absmax.shape[0], nogil=True, num_threads=num_threads, schedule="static"):
        scale = absmax[b]
        for i in range(b * blocksize, _block_end(b, blocksize, n)):
            out[i] = code[codes[i]] * scale


def dequantize_4bit_packed(const u8[::1] packed,      # in: (ceil(n / 2),) two codes a byte
                           const float[::1] absmax,   # in: (ceil(n / blocksize),)
                           const float[::1] code,     # in: (16,)
                           Py_ssize_t blocksize,
                           out,                       # out: (n,) float32, or uint16 bfloat16 bits
                           int num_threads=1):
    """Fused unpack + lookup + scale, into float32 or bfloat16 (``out``'s dtype chooses).

    float32 ``out``: equals ``dequantize_blockwise(unpack_nibbles(packed, n),
    absmax, code, blocksize)`` with ``n = out.shape[0]``. uint16 ``out``: that
    float32 result rounded to bfloat16 (``lookup16_bf16_bits``: nearest even,
    subnormals to zero, as bitsandbytes' kernel), written as its bits.
    """
    if _holds_bfloat16_bits(out):
        _dequantize_4bit[uint16_t](packed, absmax, code, blocksize, out, num_threads)
    else:   # float32, or a ValueError naming the dtype it got
        _dequantize_4bit[float](packed, absmax, code, blocksize, out, num_threads)


def dequantize_4bit_packed_nested(const u8[::1] packed,          # in: (ceil(n / 2),)
                                  const u8[::1] absmax_codes,    # in: (n_blocks,) 8-bit codes
                                  const float[::1] nested_absmax,  # in: (n_nested,)
                                  const float[::1] nested_code,  # in: (256,)
                                  float offset, Py_ssize_t nested_blocksize,
                                  const float[::1] code,         # in: (16,)
                                  Py_ssize_t blocksize,
                                  out,                           # out: (n,) float32 or bf16 bits
                                  int num_threads=1):
    """Fused double dequantization of the constants and 4-bit dequantization.

    Equals ``dequantize_4bit_packed(packed, double_dequantize(absmax_codes,
    nested_absmax, offset, nested_blocksize), code, blocksize, out)``: each
    block's constant ``nested_code[c] * nested_absmax[b // nested_blocksize] + offset``
    is rounded after the product and after the sum, as in NumPy.
    ``n_blocks = ceil(n / blocksize)``, ``n_nested = ceil(n_blocks / nested_blocksize)``.
    """
    if _holds_bfloat16_bits(out):
        _dequantize_4bit_nested[uint16_t](packed, absmax_codes, nested_absmax, nested_code,
                                          offset, nested_blocksize, code, blocksize, out,
                                          num_threads)
    else:
        _dequantize_4bit_nested[float](packed, absmax_codes, nested_absmax, nested_code,
                                       offset, nested_blocksize, code, blocksize, out,
                                       num_threads)


# The names of the bfloat16 kernels before the two merged (callers may keep them):
# the same functions, the output's dtype chooses.
dequantize_4bit_packed_bf16 = dequantize_4bit_packed
dequantize_4bit_packed_nested_bf16 = dequantize_4bit_packed_nested


cdef bint _holds_bfloat16_bits(object out):
    """``out`` is a buffer of native uint16 (bfloat16 bit patterns); else the float32 path."""
    try:
        return memoryview(out).format.lstrip("@=<") == "H"
    except TypeError:       # not a buffer: the float32 conversion names the problem
        return False


cdef int _dequantize_4bit(const u8[::1] packed, const float[::1] absmax, const float[::1] code,
                          Py_ssize_t blocksize, out_t[::1] out, int num_threads) except -1:
    cdef Py_ssize_t n = out.shape[0], n_blocks = absmax.shape[0]
    cdef Py_ssize_t t
    _check_4bit_dequantize(n, packed.shape[0], n_blocks, "absmax", code, blocksize, num_threads)
    for t in prange(_ceil_div(n_blocks, BLOCKS_PER_TASK), nogil=True, num_threads=num_threads,
                    schedule="static"):
        _dequantize_4bit_blocks(&packed[0], &code[0], &absmax[t * BLOCKS_PER_TASK],
                                t * BLOCKS_PER_TASK, _block_end(t, BLOCKS_PER_TASK, n_blocks),
                                blocksize, n, &out[0])
    return 0


cdef int _dequantize_4bit_nested(const u8[::1] packed, const u8[::1] absmax_codes,
                                 const float[::1] nested_absmax, const float[::1] nested_code,
                                 float offset, Py_ssize_t nested_blocksize,
                                 const float[::1] code, Py_ssize_t blocksize, out_t[::1] out,
                                 int num_threads) except -1:
    cdef Py_ssize_t n = out.shape[0], n_blocks = absmax_codes.shape[0]
    cdef Py_ssize_t t
    _check_4bit_dequantize(n, packed.shape[0], n_blocks, "absmax_codes", code, blocksize,
                           num_threads)
    _check_nested(n_blocks, nested_absmax.shape[0], nested_code, nested_blocksize)
    for t in prange(_ceil_div(n_blocks, BLOCKS_PER_TASK), nogil=True, num_threads=num_threads,
                    schedule="static"):
        _dequantize_4bit_nested_blocks(&packed[0], &absmax_codes[0], &nested_absmax[0],
                                       &nested_code[0], offset, nested_blocksize, &code[0],
                                       t * BLOCKS_PER_TASK,
                                       _block_end(t, BLOCKS_PER_TASK, n_blocks), blocksize, n,
                                       &out[0])
    return 0


# -- matrix-vector products straight from the codes ----------------------------

def gemv_4bit(const u8[::1] packed,      # in: (out * in / 2,) two codes a byte, row-major W
              const float[::1] absmax,   # in: (out * in / blocksize,) float32 constants
              const float[::1] code,     # in: (16,)
              Py_ssize_t blocksize,
              const float[:, ::1] x,     # in: (m, in) float32, m small (decoding)
              float[:, ::1] y,           # out: (m, out) float32
              int num_threads=1):
    """``y = x @ dequantize(W).T`` for a few rows of ``x``, never forming ``W`` (see gemv4.h).

    Rows of ``x`` are taken 8 at a time (each group reads the codes again).

    Equals ``x @ dequantize_4bit_packed(packed, absmax, code, blocksize).reshape(out, in).T``
    up to the order of the float32 sums: every weight is the same float32
    product ``code[q] * absmax[b]``. ``W`` is ``(out, in)`` and ``y.shape[1] == out``.
    """
    cdef Py_ssize_t m = x.shape[0], n_in = x.shape[1], n_out = y.shape[1]
    cdef Py_ssize_t t
    cdef float* xs = NULL     # (m, in) x reordered for the vector paths, or NULL: portable
    _check_gemv(m, n_in, n_out, y.shape[0], packed.shape[0], absmax.shape[0], code, blocksize,
                num_threads)
    if gemv4_wants_split_x(blocksize, n_in):
        xs = <float*>malloc(m * n_in * sizeof(float))
        if xs == NULL:
            raise MemoryError(f"gemv_4bit: no memory for a copy of x ({m} x {n_in} float32)")
        gemv4_split_x(&x[0, 0], m, n_in, xs)
    try:
        for t in prange(_ceil_div(n_out, GEMV_ROWS_PER_TASK), nogil=True,
                        num_threads=num_threads, schedule="static"):
            gemv4(&packed[0], &absmax[0], &code[0], blocksize, &x[0, 0], xs, m, n_in,
                  t * GEMV_ROWS_PER_TASK, _block_end(t, GEMV_ROWS_PER_TASK, n_out), &y[0, 0],
                  n_out)
    finally:
        free(xs)


# -- packing -------------------------------------------------------------------

cdef inline u8 _pack_range(const u8* codes, u8* packed, Py_ssize_t start,
                           Py_ssize_t end) noexcept nogil:
    """Pack pairs [start, end); returns the OR of the codes read (> 15: one was not 4-bit)."""
    cdef Py_ssize_t j
    cdef u8 seen = 0
    for j in range(start, end):
        packed[j] = (codes[2 * j] << 4) | (codes[2 * j + 1] & 15)
        seen = seen | codes[2 * j] | codes[2 * j + 1]
    return seen


cdef inline void _unpack_range(const u8* packed, u8* codes, Py_ssize_t start,
                               Py_ssize_t end) noexcept nogil:
    cdef Py_ssize_t j
    cdef u8 byte
    for j in range(start, end):
        byte = packed[j]          # read once: the stores below may alias it (char pointers)
        codes[2 * j] = byte >> 4
        codes[2 * j + 1] = byte & 15


def pack_nibbles(const u8[::1] codes,   # in: (n,) 4-bit codes 0..15
                 pad,
                 u8[::1] packed,        # out: (ceil(n / 2),)
                 int num_threads=1):
    """Equals ``qlora_ref.packing.pack_nibbles(codes, pad)``.

    Like it, raises ``ValueError`` for a ``pad`` outside 0..15 (before any
    loop) and for a code of 16 or more (found while packing, so ``packed``
    is then partly written).
    """
    cdef Py_ssize_t n = codes.shape[0]
    cdef Py_ssize_t n_pairs = n // 2
    cdef Py_ssize_t s
    cdef u8 pad_nibble = _checked_pad(pad)
    cdef u8 seen = 0
    _check_nibbles(n, packed.shape[0], num_threads)
    for s in prange(_ceil_div(n_pairs, SPAN), nogil=True, num_threads=num_threads,
                    schedule="static"):
        seen |= _pack_range(&codes[0], &packed[0], s * SPAN, _block_end(s, SPAN, n_pairs))
    if n % 2:
        packed[n_pairs] = (codes[n - 1] << 4) | pad_nibble
        seen |= codes[n - 1]
    if seen > 15:
        raise ValueError("codes must be 4-bit codes, integers from 0 to 15; found one of 16 "
                         "or more")


def unpack_nibbles(const u8[::1] packed,   # in: (ceil(n / 2),)
                   u8[::1] codes,          # out: (n,) 4-bit codes
                   int num_threads=1):
    """Equals ``qlora_ref.packing.unpack_nibbles(packed, codes.shape[0])``."""
    cdef Py_ssize_t n = codes.shape[0]
    cdef Py_ssize_t n_pairs = n // 2
    cdef Py_ssize_t s
    _check_nibbles(n, packed.shape[0], num_threads)
    for s in prange(_ceil_div(n_pairs, SPAN), nogil=True, num_threads=num_threads,
                    schedule="static"):
        _unpack_range(&packed[0], &codes[0], s * SPAN, _block_end(s, SPAN, n_pairs))
    if n % 2:
        codes[n - 1] = packed[n_pairs] >> 4


# -- one decoding step's pieces (decode_step.pxi) --------------------------------

include "decode_step.pxi"
