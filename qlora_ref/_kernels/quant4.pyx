# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cython kernels for blockwise quantization, 4-bit packing and dequantization.

Loops only, over typed memoryviews, without the GIL; blocks are split
across threads with ``prange`` when the extension was built with OpenMP.
Every function names the NumPy expression it equals; the tests check the
bytes are the same (``tests/test_kernels_equal.py``). Arithmetic is float32
throughout and the extension is compiled with ``-ffp-contract=off`` so that
``a * b + c`` is rounded twice, exactly as NumPy (and bitsandbytes) round it.

Inputs are finite (``qlora_ref.validation`` rejects NaN and infinity before
any kernel runs); the kernels rely on it only where noted.

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
from cython.parallel cimport prange
from libc.stdint cimport int32_t, uint16_t, uint32_t
from libc.string cimport memcpy

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
    float32 products, so the same roundings), then each element is a lookup.
    """
    cdef float product[16]
    cdef out_t table[16]
    cdef Py_ssize_t i
    cdef int c
    cdef u8 byte
    for c in range(16):
        product[c] = code[c] * scale
    for c in range(16):
        if out_t is float:
            table[c] = product[c]
        else:
            table[c] = _bfloat16_bits(product[c])
    i = start
    while i + 8 <= end:              # 4 bytes per step: less loop overhead per store
        byte = packed[i >> 1]
        out[i] = table[byte >> 4]
        out[i + 1] = table[byte & 15]
        byte = packed[(i >> 1) + 1]
        out[i + 2] = table[byte >> 4]
        out[i + 3] = table[byte & 15]
        byte = packed[(i >> 1) + 2]
        out[i + 4] = table[byte >> 4]
        out[i + 5] = table[byte & 15]
        byte = packed[(i >> 1) + 3]
        out[i + 6] = table[byte >> 4]
        out[i + 7] = table[byte & 15]
        i = i + 8
    while i + 2 <= end:
        byte = packed[i >> 1]
        out[i] = table[byte >> 4]
        out[i + 1] = table[byte & 15]
        i = i + 2
    if (end - start) % 2:
        out[end - 1] = table[packed[(end - 1) >> 1] >> 4]


# -- quantization --------------------------------------------------------------

def quantize_blockwise(const float[::1] x, const float[::1] midpoints, const u8[::1] order,
                       int log2_levels, Py_ssize_t blocksize, u8[::1] codes, float[::1] absmax,
                       int num_threads=1):
    """Blockwise absmax quantization to unpacked codes.

    Equals ``qlora_ref.blockwise.quantize_blockwise(x, code, blocksize)`` with
    ``midpoints, order = decision_boundaries(code)`` and ``len(code) == 2**log2_levels``.
    """
    cdef Py_ssize_t n = x.shape[0]
    cdef Py_ssize_t n_blocks = absmax.shape[0]
    cdef Py_ssize_t b, i, start, end
    cdef float scale
    for b in prange(n_blocks, nogil=True, num_threads=num_threads, schedule="static"):
        start = b * blocksize
        end = start + blocksize
        if end > n:
            end = n
        absmax[b] = _block_absmax(&x[start], end - start)
        scale = _reciprocal(absmax[b])
        for i in range(start, end):
            codes[i] = order[_count_below(&midpoints[0], log2_levels, x[i] * scale)]


def quantize_4bit_packed(const float[::1] x, const float[::1] midpoints, const u8[::1] order,
                         Py_ssize_t blocksize, u8 pad_code, u8[::1] packed, float[::1] absmax,
                         int num_threads=1):
    """Fused 4-bit quantization and packing (``blocksize`` must be even).

    Equals ``pack_nibbles(quantize_blockwise(x, code, blocksize)[0], pad=pad_code)``
    together with the ``absmax`` from the same call.
    """
    cdef Py_ssize_t n = x.shape[0]
    cdef Py_ssize_t n_blocks = absmax.shape[0]
    cdef Py_ssize_t b, i, start, end
    cdef float scale
    cdef u8 high, low
    cdef u8 pair_order[256]     # (sorted index pair) -> packed byte of the two codes
    cdef int p
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
                low = pad_code
            packed[i >> 1] = (high << 4) | low
            i = i + 2


# -- dequantization ------------------------------------------------------------

def dequantize_blockwise(const u8[::1] codes, const float[::1] absmax, const float[::1] code,
                         Py_ssize_t blocksize, float[::1] out, int num_threads=1):
    """Equals ``qlora_ref.blockwise.dequantize_blockwise(codes, absmax, code, blocksize)``."""
    cdef Py_ssize_t n = codes.shape[0]
    cdef Py_ssize_t n_blocks = absmax.shape[0]
    cdef Py_ssize_t b, i, start, end
    cdef float scale
    for b in prange(n_blocks, nogil=True, num_threads=num_threads, schedule="static"):
        start = b * blocksize
        end = start + blocksize
        if end > n:
            end = n
        scale = absmax[b]
        for i in range(start, end):
            out[i] = code[codes[i]] * scale


def dequantize_4bit_packed(const u8[::1] packed, const float[::1] absmax, const float[::1] code,
                           Py_ssize_t blocksize, float[::1] out, int num_threads=1):
    """Fused unpack + lookup + scale.

    Equals ``dequantize_blockwise(unpack_nibbles(packed, n), absmax, code, blocksize)``
    with ``n = out.shape[0]``.
    """
    _dequantize_4bit(packed, absmax, code, blocksize, &out[0], out.shape[0], num_threads)


def dequantize_4bit_packed_bf16(const u8[::1] packed, const float[::1] absmax,
                                const float[::1] code, Py_ssize_t blocksize, uint16_t[::1] out,
                                int num_threads=1):
    """:func:`dequantize_4bit_packed` rounded to bfloat16, written as its uint16 bits.

    Equals ``torch.from_numpy(dequantize_4bit_packed(...)).to(torch.bfloat16)``
    viewed as 16-bit integers: the float32 product, then round to nearest even.
    """
    _dequantize_4bit(packed, absmax, code, blocksize, &out[0], out.shape[0], num_threads)


cdef void _dequantize_4bit(const u8[::1] packed, const float[::1] absmax, const float[::1] code,
                           Py_ssize_t blocksize, out_t* out, Py_ssize_t n,
                           int num_threads) noexcept:
    cdef Py_ssize_t n_blocks = absmax.shape[0]
    cdef Py_ssize_t b, start, end
    for b in prange(n_blocks, nogil=True, num_threads=num_threads, schedule="static"):
        start = b * blocksize
        end = start + blocksize
        if end > n:
            end = n
        _dequantize_4bit_block(&packed[0], &code[0], absmax[b], start, end, out)


def dequantize_4bit_packed_nested(const u8[::1] packed, const u8[::1] absmax_codes,
                                  const float[::1] nested_absmax, const float[::1] nested_code,
                                  float offset, Py_ssize_t nested_blocksize,
                                  const float[::1] code, Py_ssize_t blocksize, float[::1] out,
                                  int num_threads=1):
    """Fused double dequantization of the constants and 4-bit dequantization.

    Equals ``dequantize_4bit_packed(packed, double_dequantize(absmax_codes,
    nested_absmax, offset, nested_blocksize), code, blocksize, out)``: each
    block's constant ``nested_code[c] * nested_absmax[b // 256] + offset`` is
    rounded after the product and after the sum, as in NumPy.
    """
    _dequantize_4bit_nested(packed, absmax_codes, nested_absmax, nested_code, offset,
                            nested_blocksize, code, blocksize, &out[0], out.shape[0], num_threads)


def dequantize_4bit_packed_nested_bf16(const u8[::1] packed, const u8[::1] absmax_codes,
                                       const float[::1] nested_absmax,
                                       const float[::1] nested_code, float offset,
                                       Py_ssize_t nested_blocksize, const float[::1] code,
                                       Py_ssize_t blocksize, uint16_t[::1] out,
                                       int num_threads=1):
    """:func:`dequantize_4bit_packed_nested` rounded to bfloat16, written as its uint16 bits.

    Equals ``torch.from_numpy(dequantize_4bit_packed_nested(...)).to(torch.bfloat16)``
    viewed as 16-bit integers.
    """
    _dequantize_4bit_nested(packed, absmax_codes, nested_absmax, nested_code, offset,
                            nested_blocksize, code, blocksize, &out[0], out.shape[0], num_threads)


cdef void _dequantize_4bit_nested(const u8[::1] packed, const u8[::1] absmax_codes,
                                  const float[::1] nested_absmax, const float[::1] nested_code,
                                  float offset, Py_ssize_t nested_blocksize,
                                  const float[::1] code, Py_ssize_t blocksize, out_t* out,
                                  Py_ssize_t n, int num_threads) noexcept:
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
        _dequantize_4bit_block(&packed[0], &code[0], scale, start, end, out)


# -- packing -------------------------------------------------------------------

cdef inline void _pack_range(const u8* codes, u8* packed, Py_ssize_t start,
                             Py_ssize_t end) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(start, end):
        packed[j] = (codes[2 * j] << 4) | (codes[2 * j + 1] & 15)


cdef inline void _unpack_range(const u8* packed, u8* codes, Py_ssize_t start,
                               Py_ssize_t end) noexcept nogil:
    cdef Py_ssize_t j
    cdef u8 byte
    for j in range(start, end):
        byte = packed[j]          # read once: the stores below may alias it (char pointers)
        codes[2 * j] = byte >> 4
        codes[2 * j + 1] = byte & 15


def pack_nibbles(const u8[::1] codes, u8 pad, u8[::1] packed, int num_threads=1):
    """Equals ``qlora_ref.packing.pack_nibbles(codes, pad)``."""
    cdef Py_ssize_t n = codes.shape[0]
    cdef Py_ssize_t n_pairs = n // 2
    cdef Py_ssize_t n_spans = (n_pairs + SPAN - 1) // SPAN
    cdef Py_ssize_t s, end
    for s in prange(n_spans, nogil=True, num_threads=num_threads, schedule="static"):
        end = (s + 1) * SPAN
        if end > n_pairs:
            end = n_pairs
        _pack_range(&codes[0], &packed[0], s * SPAN, end)
    if n % 2:
        packed[n_pairs] = (codes[n - 1] << 4) | (pad & 15)


def unpack_nibbles(const u8[::1] packed, u8[::1] codes, int num_threads=1):
    """Equals ``qlora_ref.packing.unpack_nibbles(packed, codes.shape[0])``."""
    cdef Py_ssize_t n = codes.shape[0]
    cdef Py_ssize_t n_pairs = n // 2
    cdef Py_ssize_t n_spans = (n_pairs + SPAN - 1) // SPAN
    cdef Py_ssize_t s, end
    for s in prange(n_spans, nogil=True, num_threads=num_threads, schedule="static"):
        end = (s + 1) * SPAN
        if end > n_pairs:
            end = n_pairs
        _unpack_range(&packed[0], &codes[0], s * SPAN, end)
    if n % 2:
        codes[n - 1] = packed[n_pairs] >> 4
