# cython: language_level=3
"""Cython kernels for blockwise quantization, 4-bit packing and dequantization.

Loops only, over typed memoryviews, without the GIL; blocks are split
across threads with ``prange`` when the extension was built with OpenMP.
Every function names the NumPy expression it equals; the tests check the
bytes are the same (``tests/test_kernels_equal.py``). Arithmetic is float32
throughout and the extension is compiled with ``-ffp-contract=off`` so that
``a * b + c`` is rounded twice, exactly as NumPy (and bitsandbytes) round it.

Inputs are finite (``qlora_ref.validation`` rejects NaN and infinity before
any kernel runs); the kernels rely on it only where noted.

Argument checks: every ``def`` first checks, in O(1) and before any loop,
that its array lengths agree with each other and with ``blocksize``, that
``blocksize`` is positive (even where two codes share a byte), that a pad
code is 0..15, ``num_threads`` at least 1 and the input not empty, and that
the tables are those of a code: 16 or 256 values, finite and within [-1, 1]
(``qlora_ref.validation.check_code``), sorted NaN-free midpoints, in-range
sort indices; it raises ``ValueError`` naming the argument, the
expected and the actual value. The loops run without bounds checks, so a
wrong length would otherwise read or write past an array (seen: uninitialised
floats from a short ``absmax``, NaN from a 16-entry table given to the 8-bit
kernel). Each memoryview argument is marked ``# in:`` or ``# out:`` with its
length.

Note (checks in a kernel file): the choice of path and the validation of
meaning live in Python (``qlora_ref.validation``, ``QuantState.validate``);
this file holds loops. These checks guard memory, not meaning, for every
caller of a ``def`` here, cost a few comparisons per call, and choose
nothing: no dispatch moved into this file.

Compiler directives are set in ``setup.py``, not in this file's header
(which would override them): ``boundscheck=False, wraparound=False,
cdivision=True, initializedcheck=False``, or, with
``QLORA_REF_DEBUG_CYTHON=1``, all four the other way round (:data:`DEBUG_BUILD`
says which). The debug build checks every memoryview index; the small
``inline`` helpers that loop over raw pointers (``_dequantize_4bit_block``,
``_pack_range``, ...) are covered only by the length checks above.

Speed notes (measured in ``docs/benchmarks.md`` with ``python -m qlora_ref.bench``):

* *Nearest 4-bit code by counting.* The sorted position of ``v`` among the
  15 midpoints is ``#{k : mids[k] < v}``. Counting it with 15 compares, 32
  values at a time, has no branches and vectorises with SSE2 alone; the
  binary search it replaces mispredicted about every other step.
* *Block absmax on the bits.* A float max reduction is not vectorised
  without ``-ffast-math``; the same maximum taken over the int32 bit
  patterns (sign cleared) is, and gives the same number for finite input.
* *Dequantize through a per-block table.* A block has only 16 distinct
  outputs ``code[c] * scale``; they are computed first (the same float32
  products, rounded the same way) and each element is one lookup. The
  bfloat16 kernels round that table, not every element.
* *Raw pointers in the byte loops.* A ``uint8`` store may alias anything,
  including a memoryview's data pointer, so pack/unpack run over plain
  pointers in small inline functions; GCC then vectorises them.
* *Portable flags.* No ``-march=native`` by default: the build vectorises
  with the baseline instruction set (SSE2 on x86-64, NEON on arm64);
  ``QLORA_REF_NATIVE=1`` opts in to the build machine's (AVX2 here).
"""
cimport cython
from cython.parallel cimport prange
from libc.stdint cimport int32_t, uint16_t, uint32_t
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


ctypedef fused out_t:   # dequantized output: float32, or bfloat16 bits
    float
    uint16_t


cdef extern from *:
    """
    #ifdef QLORA_REF_DEBUG_CYTHON
    static int _debug_build(void) { return 1; }
    #else
    static int _debug_build(void) { return 0; }
    #endif
    """
    int _debug_build()

#: True if this extension is the debug build (``QLORA_REF_DEBUG_CYTHON=1`` in
#: ``setup.py``): bounds and wraparound checks on, C division off, so an
#: out-of-range memoryview access raises ``IndexError`` instead of reading
#: past the array. The ``.ci/run`` script asserts it before running the
#: kernel tests under that build.
DEBUG_BUILD = bool(_debug_build())


cdef extern from "lookup16.h" nogil:
    # out[2j], out[2j+1] = code[bytes[j] >> 4] * scale, code[bytes[j] & 15] * scale
    void lookup16_f32(const u8* bytes, Py_ssize_t n_bytes, const float* code, float scale,
                      float* out)
    void lookup16_bf16(const u8* bytes, Py_ssize_t n_bytes, const float* code, float scale,
                       uint16_t* out)
    int lookup16_select(int level)
    int lookup16_level()
    int lookup16_best()

cdef extern from "gemv4.h" nogil:
    # y[r, o] = sum_i x[r, i] * code[q(o, i)] * absmax[block of (o, i)]
    void gemv4(const u8* packed, const float* absmax, const float* code, Py_ssize_t blocksize,
               const float* x, Py_ssize_t m, Py_ssize_t in_features, Py_ssize_t o_start,
               Py_ssize_t o_end, float* y, Py_ssize_t out_features)

#: The inner loop of 4-bit dequantization, by name (lookup16.h): every path writes
#: the same bytes; they differ in how many lookups one instruction does.
SIMD_LEVELS = ("portable", "avx2", "avx512")


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


def openmp_enabled():
    """True if this extension was compiled with OpenMP (``prange`` runs in parallel)."""
    return bool(_openmp())


cdef extern from *:
    """
    #ifdef _OPENMP
    static int _openmp(void) { return 1; }
    #else
    static int _openmp(void) { return 0; }
    #endif
    """
    int _openmp()


# -- argument checks -----------------------------------------------------------
#
# O(1) each (a table check reads at most 256 entries, whatever n is); run with
# the GIL, before a kernel's loops. They raise ValueError naming the argument.

cdef inline Py_ssize_t _ceil_div(Py_ssize_t n, Py_ssize_t d) noexcept:
    """``ceil(n / d)`` for ``n >= 0, d > 0``, without the overflow of ``(n + d - 1) // d``."""
    return n // d + (n % d != 0)


cdef int _check_length(str name, Py_ssize_t actual, Py_ssize_t expected, str why) except -1:
    """``len(name) == expected``, where ``why`` says where ``expected`` comes from."""
    if actual != expected:
        raise ValueError(f"{name} has length {actual}; expected {expected} ({why})")
    return 0


cdef int _check_blocks(str name, Py_ssize_t actual, Py_ssize_t n, str n_name,
                       Py_ssize_t blocksize, str blocksize_name) except -1:
    """One constant per block: ``len(name) == ceil(n / blocksize)`` (a partial block counts)."""
    cdef Py_ssize_t expected = _ceil_div(n, blocksize)
    if actual != expected:
        raise ValueError(
            f"{name} has length {actual}; expected ceil({n_name} / {blocksize_name}) = "
            f"ceil({n} / {blocksize}) = {expected}, one per block")
    return 0


cdef int _check_packed(str name, Py_ssize_t actual, Py_ssize_t n, str n_name) except -1:
    """Two 4-bit codes per byte: ``len(name) == ceil(n / 2)``."""
    cdef Py_ssize_t expected = _ceil_div(n, 2)
    if actual != expected:
        raise ValueError(f"{name} has length {actual}; expected ceil({n_name} / 2) = "
                         f"ceil({n} / 2) = {expected} bytes, two 4-bit codes per byte")
    return 0


cdef int _check_blocksize(str name, Py_ssize_t blocksize, bint even) except -1:
    """``blocksize > 0``; and even where codes are packed, so a byte never spans two blocks."""
    if blocksize <= 0 or (even and blocksize % 2 != 0):
        raise ValueError(f"{name} must be {'an even' if even else 'a'} positive integer here; "
                         f"got {blocksize}")
    return 0


cdef int _check_nonempty(str name, Py_ssize_t n) except -1:
    """(De)quantization needs at least one value, as its NumPy twins do."""
    if n == 0:
        raise ValueError(f"{name} is empty; there is nothing to quantize or dequantize")
    return 0


cdef int _check_threads(int num_threads) except -1:
    if num_threads < 1:
        raise ValueError(f"num_threads must be at least 1; got {num_threads}")
    return 0


cdef int _check_code(str name, const float[::1] code, Py_ssize_t levels) except -1:
    """A code table: ``levels`` values, each finite and within [-1, 1].

    The rule of ``qlora_ref.validation.check_code``, which the NumPy twins apply:
    a NaN entry would otherwise come out as NaN wherever a code points to it.
    """
    cdef Py_ssize_t k
    cdef bint inside = True
    _check_length(name, code.shape[0], levels, "the values of the code")
    for k in range(levels):                  # no early exit: the loop vectorises
        inside = inside & (-1 <= code[k]) & (code[k] <= 1)     # False for NaN
    if not inside:
        for k in range(levels):
            if not -1 <= code[k] <= 1:
                raise ValueError(f"{name} values must be finite and within [-1, 1]; "
                                 f"got {name}[{k}] = {code[k]}")
    return 0


cdef int _check_log2_levels(int log2_levels) except -1:
    if not 1 <= log2_levels <= 8:       # codes are uint8
        raise ValueError(f"log2_levels must be 1..8 (a code of 2 to 256 values); "
                         f"got {log2_levels}")
    return 0


cdef int _check_tables(const float[::1] midpoints, const u8[::1] order,
                       Py_ssize_t levels) except -1:
    """The tables of a ``levels``-value code, as ``decision_boundaries(code)`` makes them.

    ``levels - 1`` midpoints, sorted and free of NaN (the nearest-code search
    counts or bisects on that order); ``levels`` sort-order entries, each an
    index below ``levels`` (packed, an index of 16 would spill into the
    neighbouring nibble).
    """
    cdef Py_ssize_t k
    _check_length("midpoints", midpoints.shape[0], levels - 1, "one between each two code values")
    _check_length("order", order.shape[0], levels, "one per code value")
    for k in range(levels - 1):
        if midpoints[k] != midpoints[k] or (k > 0 and not midpoints[k - 1] <= midpoints[k]):
            raise ValueError(f"midpoints must be sorted and free of NaN; got "
                             f"midpoints[{k}] = {midpoints[k]} after "
                             f"{midpoints[k - 1] if k > 0 else None}")
    for k in range(levels):
        if order[k] >= levels:
            raise ValueError(f"order[{k}] = {order[k]} is not an index into a code of "
                             f"{levels} values")
    return 0


cdef int _checked_pad(object pad) except -1:
    """The pad nibble as an int 0..15 (the same rule as ``qlora_ref.packing.pack_nibbles``)."""
    try:
        value = _as_index(pad)
    except TypeError:
        value = None
    if value is None or isinstance(pad, bool) or not 0 <= value <= 15:
        raise ValueError(f"pad must be a 4-bit code, an integer from 0 to 15; got {pad!r}")
    return value


# -- helpers -----------------------------------------------------------------

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


cdef inline uint16_t _bfloat16_bits(float v) noexcept nogil:
    """float32 -> bfloat16 bits, round to nearest, ties to even.

    The rule of torch's ``tensor.to(torch.bfloat16)`` (c10::round_to_nearest_even):
    add 0x7FFF plus the lowest kept bit, keep the high 16 bits; NaN -> 0x7FC0.
    Written without branches so that a table of 16 converts in SIMD.
    """
    cdef uint32_t u
    cdef uint16_t rounded
    memcpy(&u, &v, 4)
    rounded = <uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16)
    return 0x7FC0 if v != v else rounded


cdef inline void _dequantize_4bit_block(const u8* packed, const float* code, float scale,
                                        Py_ssize_t start, Py_ssize_t end,
                                        out_t* out) noexcept nogil:
    """``out[i] = code[q_i] * scale`` for i in [start, end), ``q`` read from the nibbles.

    A block has only 16 distinct outputs: they are computed first (the same
    float32 products, so the same roundings), then each element is a lookup,
    two per byte, by the path of ``lookup16.h`` chosen for this CPU.
    """
    if out_t is float:
        lookup16_f32(packed + (start >> 1), (end - start) >> 1, code, scale, out + start)
        if (end - start) % 2:  # an odd tail: its value is the high nibble of the last byte
            out[end - 1] = code[packed[(end - 1) >> 1] >> 4] * scale
    else:
        lookup16_bf16(packed + (start >> 1), (end - start) >> 1, code, scale, out + start)
        if (end - start) % 2:
            out[end - 1] = _bfloat16_bits(code[packed[(end - 1) >> 1] >> 4] * scale)
    # start < end and start even: the callers check len(absmax) == ceil(n / blocksize) and an
    # even blocksize (one constant too many made end - start negative, and this line wrote
    # the last output again with that constant's scale)


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
    cdef Py_ssize_t n_blocks = absmax.shape[0]
    cdef Py_ssize_t b, i, start, end
    cdef float scale, v
    _check_nonempty("x", n)
    _check_log2_levels(log2_levels)
    _check_blocksize("blocksize", blocksize, False)
    _check_threads(num_threads)
    _check_tables(midpoints, order, 1 << log2_levels)
    _check_length("codes", codes.shape[0], n, "one per value of x")
    _check_blocks("absmax", n_blocks, n, "len(x)", blocksize, "blocksize")
    for b in prange(n_blocks, nogil=True, num_threads=num_threads, schedule="static"):
        start = b * blocksize
        end = start + blocksize
        if end > n:
            end = n
        absmax[b] = _block_absmax(&x[start], end - start)
        scale = _reciprocal_unclamped(absmax[b])   # matches bitsandbytes' 8-bit kernel: no floor
        for i in range(start, end):
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
    cdef Py_ssize_t n_blocks = absmax.shape[0]
    cdef Py_ssize_t b, i, start, end
    cdef float scale
    cdef u8 high, low
    cdef u8 pad = _checked_pad(pad_code)
    cdef u8 pair_order[256]     # (sorted index pair) -> packed byte of the two codes
    cdef int p
    _check_nonempty("x", n)
    _check_blocksize("blocksize", blocksize, True)
    _check_threads(num_threads)
    _check_tables(midpoints, order, 16)
    _check_packed("packed", packed.shape[0], n, "len(x)")
    _check_blocks("absmax", n_blocks, n, "len(x)", blocksize, "blocksize")
    for p in range(256):
        pair_order[p] = (order[p >> 4] << 4) | order[p & 15]
    for b in prange(n_blocks, nogil=True, num_threads=num_threads, schedule="static"):
        start = b * blocksize
        end = start + blocksize
        if end > n:
            end = n
        absmax[b] = _block_absmax(&x[start], end - start)
        scale = _reciprocal(absmax[b])
        i = start
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
    cdef Py_ssize_t n_blocks = absmax.shape[0]
    cdef Py_ssize_t b, i, start, end
    cdef float scale
    _check_nonempty("codes", n)
    _check_blocksize("blocksize", blocksize, False)
    _check_threads(num_threads)
    _check_code("code", code, 256)         # 256: every uint8 code indexes it
    _check_length("out", out.shape[0], n, "one per code")
    _check_blocks("absmax", n_blocks, n, "len(codes)", blocksize, "blocksize")
    for b in prange(n_blocks, nogil=True, num_threads=num_threads, schedule="static"):
        start = b * blocksize
        end = start + blocksize
        if end > n:
            end = n
        scale = absmax[b]
        for i in range(start, end):
            out[i] = code[codes[i]] * scale


cdef int _check_4bit_dequantize(Py_ssize_t n, Py_ssize_t packed_len, Py_ssize_t n_constants,
                                str constants_name, const float[::1] code, Py_ssize_t blocksize,
                                int num_threads) except -1:
    """What every packed 4-bit dequantization kernel needs of its arguments."""
    _check_nonempty("out", n)
    _check_blocksize("blocksize", blocksize, True)
    _check_threads(num_threads)
    _check_code("code", code, 16)
    _check_packed("packed", packed_len, n, "len(out)")
    _check_blocks(constants_name, n_constants, n, "len(out)", blocksize, "blocksize")
    return 0


def dequantize_4bit_packed(const u8[::1] packed,      # in: (ceil(n / 2),) two codes a byte
                           const float[::1] absmax,   # in: (ceil(n / blocksize),)
                           const float[::1] code,     # in: (16,)
                           Py_ssize_t blocksize,
                           float[::1] out,            # out: (n,) float32
                           int num_threads=1):
    """Fused unpack + lookup + scale.

    Equals ``dequantize_blockwise(unpack_nibbles(packed, n), absmax, code, blocksize)``
    with ``n = out.shape[0]``.
    """
    _check_4bit_dequantize(out.shape[0], packed.shape[0], absmax.shape[0], "absmax",
                           code, blocksize, num_threads)
    _dequantize_4bit(packed, absmax, code, blocksize, out, num_threads)


def dequantize_4bit_packed_bf16(const u8[::1] packed,      # in: (ceil(n / 2),)
                                const float[::1] absmax,   # in: (ceil(n / blocksize),)
                                const float[::1] code,     # in: (16,)
                                Py_ssize_t blocksize,
                                uint16_t[::1] out,         # out: (n,) bfloat16 bits
                                int num_threads=1):
    """:func:`dequantize_4bit_packed` rounded to bfloat16, written as its uint16 bits.

    Equals ``torch.from_numpy(dequantize_4bit_packed(...)).to(torch.bfloat16)``
    viewed as 16-bit integers: the float32 product, then round to nearest even.
    """
    _check_4bit_dequantize(out.shape[0], packed.shape[0], absmax.shape[0], "absmax",
                           code, blocksize, num_threads)
    _dequantize_4bit(packed, absmax, code, blocksize, out, num_threads)


cdef int _dequantize_4bit(const u8[::1] packed, const float[::1] absmax, const float[::1] code,
                          Py_ssize_t blocksize, out_t[::1] out, int num_threads) except -1:
    # except -1, not noexcept: in the debug build an IndexError here must reach the caller
    cdef Py_ssize_t n = out.shape[0]
    cdef Py_ssize_t n_blocks = absmax.shape[0]
    cdef Py_ssize_t b, start, end
    for b in prange(n_blocks, nogil=True, num_threads=num_threads, schedule="static"):
        start = b * blocksize
        end = start + blocksize
        if end > n:
            end = n
        _dequantize_4bit_block(&packed[0], &code[0], absmax[b], start, end, &out[0])
    return 0


def dequantize_4bit_packed_nested(const u8[::1] packed,          # in: (ceil(n / 2),)
                                  const u8[::1] absmax_codes,    # in: (n_blocks,) 8-bit codes
                                  const float[::1] nested_absmax,  # in: (n_nested,)
                                  const float[::1] nested_code,  # in: (256,)
                                  float offset, Py_ssize_t nested_blocksize,
                                  const float[::1] code,         # in: (16,)
                                  Py_ssize_t blocksize,
                                  float[::1] out,                # out: (n,) float32
                                  int num_threads=1):
    """Fused double dequantization of the constants and 4-bit dequantization.

    Equals ``dequantize_4bit_packed(packed, double_dequantize(absmax_codes,
    nested_absmax, offset, nested_blocksize), code, blocksize, out)``: each
    block's constant ``nested_code[c] * nested_absmax[b // 256] + offset`` is
    rounded after the product and after the sum, as in NumPy.
    ``n_blocks = ceil(n / blocksize)``, ``n_nested = ceil(n_blocks / nested_blocksize)``.
    """
    _check_4bit_dequantize(out.shape[0], packed.shape[0], absmax_codes.shape[0],
                           "absmax_codes", code, blocksize, num_threads)
    _check_nested(absmax_codes.shape[0], nested_absmax.shape[0], nested_code, nested_blocksize)
    _dequantize_4bit_nested(packed, absmax_codes, nested_absmax, nested_code, offset,
                            nested_blocksize, code, blocksize, out, num_threads)


def dequantize_4bit_packed_nested_bf16(const u8[::1] packed,          # in: (ceil(n / 2),)
                                       const u8[::1] absmax_codes,    # in: (n_blocks,)
                                       const float[::1] nested_absmax,  # in: (n_nested,)
                                       const float[::1] nested_code,  # in: (256,)
                                       float offset, Py_ssize_t nested_blocksize,
                                       const float[::1] code,         # in: (16,)
                                       Py_ssize_t blocksize,
                                       uint16_t[::1] out,             # out: (n,) bfloat16 bits
                                       int num_threads=1):
    """:func:`dequantize_4bit_packed_nested` rounded to bfloat16, written as its uint16 bits.

    Equals ``torch.from_numpy(dequantize_4bit_packed_nested(...)).to(torch.bfloat16)``
    viewed as 16-bit integers.
    """
    _check_4bit_dequantize(out.shape[0], packed.shape[0], absmax_codes.shape[0],
                           "absmax_codes", code, blocksize, num_threads)
    _check_nested(absmax_codes.shape[0], nested_absmax.shape[0], nested_code, nested_blocksize)
    _dequantize_4bit_nested(packed, absmax_codes, nested_absmax, nested_code, offset,
                            nested_blocksize, code, blocksize, out, num_threads)


cdef int _check_nested(Py_ssize_t n_blocks, Py_ssize_t nested_len, const float[::1] nested_code,
                       Py_ssize_t nested_blocksize) except -1:
    """The second level: a 256-value 8-bit code, one ``nested_absmax`` per nested block."""
    _check_blocksize("nested_blocksize", nested_blocksize, False)
    _check_code("nested_code", nested_code, 256)   # 256: every uint8 code indexes it
    _check_blocks("nested_absmax", nested_len, n_blocks, "len(absmax_codes)", nested_blocksize,
                  "nested_blocksize")
    return 0


cdef int _dequantize_4bit_nested(const u8[::1] packed, const u8[::1] absmax_codes,
                                 const float[::1] nested_absmax, const float[::1] nested_code,
                                 float offset, Py_ssize_t nested_blocksize,
                                 const float[::1] code, Py_ssize_t blocksize, out_t[::1] out,
                                 int num_threads) except -1:
    cdef Py_ssize_t n = out.shape[0]
    cdef Py_ssize_t n_blocks = absmax_codes.shape[0]
    cdef Py_ssize_t b, start, end
    cdef float product, scale
    for b in prange(n_blocks, nogil=True, num_threads=num_threads, schedule="static"):
        start = b * blocksize
        end = start + blocksize
        if end > n:
            end = n
        product = nested_code[absmax_codes[b]] * nested_absmax[b // nested_blocksize]
        scale = product + offset
        _dequantize_4bit_block(&packed[0], &code[0], scale, start, end, &out[0])
    return 0


# -- matrix-vector products straight from the codes ----------------------------

cdef enum:
    GEMV_ROWS_PER_TASK = 16   # output rows per parallel task


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
    cdef Py_ssize_t n_tasks, t, start, end
    _check_nonempty("x", m * n_in)
    _check_threads(num_threads)
    _check_blocksize("blocksize", blocksize, True)
    _check_code("code", code, 16)
    if y.shape[0] != m:
        raise ValueError(f"y: expected {m} rows (one per row of x), got {y.shape[0]}")
    _check_packed("packed", packed.shape[0], n_out * n_in, "out * in")
    _check_blocks("absmax", absmax.shape[0], n_out * n_in, "out * in", blocksize, "blocksize")
    n_tasks = _ceil_div(n_out, GEMV_ROWS_PER_TASK)
    for t in prange(n_tasks, nogil=True, num_threads=num_threads, schedule="static"):
        start = t * GEMV_ROWS_PER_TASK
        end = start + GEMV_ROWS_PER_TASK
        if end > n_out:
            end = n_out
        gemv4(&packed[0], &absmax[0], &code[0], blocksize, &x[0, 0], m, n_in, start, end,
              &y[0, 0], n_out)


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
    cdef Py_ssize_t n_spans = (n_pairs + SPAN - 1) // SPAN
    cdef Py_ssize_t s, end
    cdef u8 pad_nibble = _checked_pad(pad)
    cdef u8 seen = 0
    _check_threads(num_threads)
    _check_packed("packed", packed.shape[0], n, "len(codes)")
    for s in prange(n_spans, nogil=True, num_threads=num_threads, schedule="static"):
        end = (s + 1) * SPAN
        if end > n_pairs:
            end = n_pairs
        seen |= _pack_range(&codes[0], &packed[0], s * SPAN, end)
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
    cdef Py_ssize_t n_spans = (n_pairs + SPAN - 1) // SPAN
    cdef Py_ssize_t s, end
    _check_threads(num_threads)
    _check_packed("packed", packed.shape[0], n, "len(codes)")
    for s in prange(n_spans, nogil=True, num_threads=num_threads, schedule="static"):
        end = (s + 1) * SPAN
        if end > n_pairs:
            end = n_pairs
        _unpack_range(&packed[0], &codes[0], s * SPAN, end)
    if n % 2:
        codes[n - 1] = packed[n_pairs] >> 4
