# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cython kernels for blockwise quantization, 4-bit packing and dequantization.

Loops only, over typed memoryviews, without the GIL; blocks are split
across threads with ``prange`` when the extension was built with OpenMP.
Every function names the NumPy expression it equals; the tests check the
bytes are the same. Arithmetic is float32 throughout and the extension is
compiled with ``-ffp-contract=off`` so that ``a * b + c`` is rounded twice,
exactly as NumPy (and bitsandbytes) round it.
"""
from cython.parallel cimport prange
from libc.math cimport fabsf

ctypedef unsigned char u8

cdef float ONE = 1.0
cdef float TINY = 1e-38   # bitsandbytes clamps absmax to 1e-38 before taking 1 / absmax


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


cdef inline int _count_below(const float* mids, int log2_levels, float v) noexcept nogil:
    """Number of midpoints strictly below ``v`` (= ``searchsorted(mids, v, "left")``).

    Branchless binary search over the 2**log2_levels - 1 sorted midpoints.
    """
    cdef int pos = 0
    cdef int step = 1 << (log2_levels - 1)
    while step > 0:
        if mids[pos + step - 1] < v:
            pos = pos + step
        step = step >> 1
    return pos


cdef inline float _block_absmax(const float* x, Py_ssize_t length) noexcept nogil:
    cdef float amax = 0, a
    cdef Py_ssize_t i
    for i in range(length):
        a = fabsf(x[i])
        if a > amax:
            amax = a
    return amax


cdef inline float _reciprocal(float amax) noexcept nogil:
    if amax < TINY:
        amax = TINY
    return ONE / amax


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
    for b in prange(n_blocks, nogil=True, num_threads=num_threads, schedule="static"):
        start = b * blocksize
        end = start + blocksize
        if end > n:
            end = n
        absmax[b] = _block_absmax(&x[start], end - start)
        scale = _reciprocal(absmax[b])
        for i in range(start, end, 2):
            high = order[_count_below(&midpoints[0], 4, x[i] * scale)]
            if i + 1 < end:
                low = order[_count_below(&midpoints[0], 4, x[i + 1] * scale)]
            else:
                low = pad_code
            packed[i >> 1] = (high << 4) | low


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


cdef inline void _dequantize_4bit_block(const u8* packed, const float* code, float scale,
                                        Py_ssize_t start, Py_ssize_t end,
                                        float* out) noexcept nogil:
    cdef Py_ssize_t i
    cdef u8 byte
    for i in range(start, end - 1, 2):
        byte = packed[i >> 1]
        out[i] = code[byte >> 4] * scale
        out[i + 1] = code[byte & 15] * scale
    if (end - start) % 2:
        out[end - 1] = code[packed[(end - 1) >> 1] >> 4] * scale


def dequantize_4bit_packed(const u8[::1] packed, const float[::1] absmax, const float[::1] code,
                           Py_ssize_t blocksize, float[::1] out, int num_threads=1):
    """Fused unpack + lookup + scale.

    Equals ``dequantize_blockwise(unpack_nibbles(packed, n), absmax, code, blocksize)``
    with ``n = out.shape[0]``.
    """
    cdef Py_ssize_t n = out.shape[0]
    cdef Py_ssize_t n_blocks = absmax.shape[0]
    cdef Py_ssize_t b, start, end
    for b in prange(n_blocks, nogil=True, num_threads=num_threads, schedule="static"):
        start = b * blocksize
        end = start + blocksize
        if end > n:
            end = n
        _dequantize_4bit_block(&packed[0], &code[0], absmax[b], start, end, &out[0])


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


def pack_nibbles(const u8[::1] codes, u8 pad, u8[::1] packed, int num_threads=1):
    """Equals ``qlora_ref.packing.pack_nibbles(codes, pad)``."""
    cdef Py_ssize_t n = codes.shape[0]
    cdef Py_ssize_t n_pairs = n // 2
    cdef Py_ssize_t j
    for j in prange(n_pairs, nogil=True, num_threads=num_threads, schedule="static"):
        packed[j] = (codes[2 * j] << 4) | (codes[2 * j + 1] & 15)
    if n % 2:
        packed[n_pairs] = (codes[n - 1] << 4) | (pad & 15)


def unpack_nibbles(const u8[::1] packed, u8[::1] codes, int num_threads=1):
    """Equals ``qlora_ref.packing.unpack_nibbles(packed, codes.shape[0])``."""
    cdef Py_ssize_t n = codes.shape[0]
    cdef Py_ssize_t n_pairs = n // 2
    cdef Py_ssize_t j
    for j in prange(n_pairs, nogil=True, num_threads=num_threads, schedule="static"):
        codes[2 * j] = packed[j] >> 4
        codes[2 * j + 1] = packed[j] & 15
    if n % 2:
        codes[n - 1] = packed[n_pairs] >> 4
