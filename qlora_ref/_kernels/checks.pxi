# checks.pxi -- the argument checks of the kernels in quant4.pyx (included there).
#
# Every ``def`` in quant4.pyx first checks, in O(1) and before any loop, that
# its array lengths agree with each other and with ``blocksize``, that
# ``blocksize`` is positive (even where two codes share a byte), that a pad
# code is 0..15, ``num_threads`` at least 1 and the input not empty, and that
# the tables are those of a code: 16 or 256 values, finite and within [-1, 1]
# (``qlora_ref.validation.check_code``), sorted NaN-free midpoints, in-range
# sort indices. It raises ``ValueError`` naming the argument, the expected and
# the actual value. The loops run without bounds checks, so a wrong length
# would otherwise read or write past an array (seen: uninitialised floats from
# a short ``absmax``, NaN from a 16-entry table given to the 8-bit kernel).
#
# Note (checks in a kernel file): the choice of path and the validation of
# meaning live in Python (``qlora_ref.validation``, ``QuantState.validate``);
# these checks guard memory, not meaning, for every caller of a kernel, cost a
# few comparisons per call, and choose nothing. A table check reads at most 256
# entries, whatever n is. They run with the GIL.


@cython.cdivision(True)     # d > 0 always (also in the debug build, which checks division)
cdef inline Py_ssize_t _ceil_div(Py_ssize_t n, Py_ssize_t d) noexcept nogil:
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

# -- what each kernel needs of its arguments -----------------------------------------

cdef int _check_quantize_blockwise(Py_ssize_t n, const float[::1] midpoints, const u8[::1] order,
                                   int log2_levels, Py_ssize_t blocksize, Py_ssize_t n_codes,
                                   Py_ssize_t n_blocks, int num_threads) except -1:
    _check_nonempty("x", n)
    _check_log2_levels(log2_levels)
    _check_blocksize("blocksize", blocksize, False)
    _check_threads(num_threads)
    _check_tables(midpoints, order, 1 << log2_levels)
    _check_length("codes", n_codes, n, "one per value of x")
    _check_blocks("absmax", n_blocks, n, "len(x)", blocksize, "blocksize")
    return 0


cdef int _check_quantize_4bit(Py_ssize_t n, const float[::1] midpoints, const u8[::1] order,
                              Py_ssize_t blocksize, Py_ssize_t n_packed, Py_ssize_t n_blocks,
                              int num_threads) except -1:
    _check_nonempty("x", n)
    _check_blocksize("blocksize", blocksize, True)
    _check_threads(num_threads)
    _check_tables(midpoints, order, 16)
    _check_packed("packed", n_packed, n, "len(x)")
    _check_blocks("absmax", n_blocks, n, "len(x)", blocksize, "blocksize")
    return 0


cdef int _check_dequantize_blockwise(Py_ssize_t n, const float[::1] code, Py_ssize_t blocksize,
                                     Py_ssize_t n_out, Py_ssize_t n_blocks,
                                     int num_threads) except -1:
    _check_nonempty("codes", n)
    _check_blocksize("blocksize", blocksize, False)
    _check_threads(num_threads)
    _check_code("code", code, 256)         # 256: every uint8 code indexes it
    _check_length("out", n_out, n, "one per code")
    _check_blocks("absmax", n_blocks, n, "len(codes)", blocksize, "blocksize")
    return 0


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


cdef int _check_nested(Py_ssize_t n_blocks, Py_ssize_t nested_len, const float[::1] nested_code,
                       Py_ssize_t nested_blocksize) except -1:
    """The second level: a 256-value 8-bit code, one ``nested_absmax`` per nested block."""
    _check_blocksize("nested_blocksize", nested_blocksize, False)
    _check_code("nested_code", nested_code, 256)   # 256: every uint8 code indexes it
    _check_blocks("nested_absmax", nested_len, n_blocks, "len(absmax_codes)", nested_blocksize,
                  "nested_blocksize")
    return 0


cdef int _check_gemv(Py_ssize_t m, Py_ssize_t n_in, Py_ssize_t n_out, Py_ssize_t y_rows,
                     Py_ssize_t n_packed, Py_ssize_t n_blocks, const float[::1] code,
                     Py_ssize_t blocksize, int num_threads) except -1:
    _check_nonempty("x", m * n_in)
    _check_threads(num_threads)
    _check_blocksize("blocksize", blocksize, True)
    _check_code("code", code, 16)
    if y_rows != m:
        raise ValueError(f"y: expected {m} rows (one per row of x), got {y_rows}")
    _check_packed("packed", n_packed, n_out * n_in, "out * in")
    _check_blocks("absmax", n_blocks, n_out * n_in, "out * in", blocksize, "blocksize")
    return 0


cdef int _check_nibbles(Py_ssize_t n, Py_ssize_t n_packed, int num_threads) except -1:
    _check_threads(num_threads)
    _check_packed("packed", n_packed, n, "len(codes)")
    return 0
