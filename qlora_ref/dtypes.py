r"""Floating-point dtypes: one way to name them, and bfloat16 without torch.

Users pass dtypes in three spellings: NumPy's (``np.float16``,
``np.dtype("float32")``), torch's (``torch.bfloat16``) and plain names
(``"float16"``). :func:`float_dtype_name` turns any of them into one short
name, so every function that takes a ``dtype`` accepts the same things and
rejects the rest with the same message.

NumPy has no bfloat16. The NumPy core therefore returns bfloat16 results as
their raw 16-bit patterns (``numpy.uint16``): the upper half of the float32
pattern, rounded to nearest, ties to even, the rounding torch's
``.to(torch.bfloat16)`` and bitsandbytes' kernels use:

.. math::

    \operatorname{bf16}(x) = \big\lfloor (b + \mathtt{0x7FFF} + \lfloor b / 2^{16} \rfloor \bmod 2) / 2^{16} \big\rfloor,
    \qquad b = \operatorname{bits}_{32}(x)

Note (subnormals): bitsandbytes' CPU dequantization rounds with the
AVX512-BF16 instruction ``VCVTNEPS2BF16``, which writes a signed zero for a
subnormal float32 input (magnitude below 2**-126); torch's ``.to(torch.bfloat16)``
(and bitsandbytes' CUDA kernel) round it like any other number. The 4-bit
dequantization to bfloat16 follows bitsandbytes' CPU kernel
(``flush_subnormals=True``); only blocks whose absmax is below about 1e-37
can tell the two apart.

``torch.from_numpy(bits.view(numpy.int16)).view(torch.bfloat16)`` turns
them into a tensor without copying; :mod:`qlora_ref.nn` does that for you.
"""
from __future__ import annotations

import numpy as np

__all__ = ["FLOAT_DTYPES", "float_dtype_name", "bfloat16_bits", "bfloat16_bits_to_float32"]

#: The floating dtypes the package reads and writes, by name.
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def float_dtype_name(dtype, what: str = "dtype") -> str:
    """The short name (``"float16"``, ``"bfloat16"``, ``"float32"``, ``"float64"``) of ``dtype``.

    Accepts a NumPy dtype or scalar type, a torch dtype, or a name (with or
    without a ``"torch."`` prefix). Anything else raises ``ValueError``.

    >>> float_dtype_name("torch.bfloat16"), float_dtype_name(np.float16)
    ('bfloat16', 'float16')
    """
    if type(dtype).__module__.split(".")[0] == "torch":   # torch.float16 etc., without importing torch
        name = str(dtype)
    elif isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
    name = name.replace("torch.", "")
    if name not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be one of {', '.join(FLOAT_DTYPES)} "
                         f"(a NumPy or torch dtype, or its name); got {dtype!r}")
    return name


def bfloat16_bits(x: np.ndarray, flush_subnormals: bool = False) -> np.ndarray:
    r"""Round float32 values to bfloat16, returned as raw ``uint16`` bit patterns.

    Round to nearest, ties to even (the formula in the module docstring);
    NaN stays a (quiet) NaN. With ``flush_subnormals`` a subnormal input
    becomes a zero of its sign first, as ``VCVTNEPS2BF16`` does (module note).

    >>> bfloat16_bits(np.array([1.0, 1.00390625, 1.01171875], np.float32))  # ties go to even
    array([16256, 16256, 16258], dtype=uint16)
    """
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    if flush_subnormals:
        subnormal = (b & 0x7F800000) == 0
        b[subnormal] &= 0x80000000                                  # a signed zero
    rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16                  # eq. bf16(x)
    out = rounded.astype(np.uint16)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    if nan.any():  # keep NaN a NaN (the rounding could carry it into infinity)
        out[nan] = ((b[nan] >> 16) | 0x0040).astype(np.uint16)
    return out


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """The float32 values of bfloat16 bit patterns (exact: bfloat16 is a truncated float32)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
