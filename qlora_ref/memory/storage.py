r"""What one stored tensor costs: bits per parameter and bytes, quantization constants included.

Paper Section 3, "4-bit NormalFloat Quantization" and "Double Quantization"
(see :mod:`qlora_ref.memory` for the whole accounting and its units).
"""
from __future__ import annotations

from ..validation import check_count, is_int

__all__ = ["BLOCKWISE_BITS", "PLAIN_BITS", "bits_per_param", "quantized_nbytes"]

#: Bit widths stored blockwise with one absmax per block (NF4/FP4, blockwise 8-bit).
BLOCKWISE_BITS = (4, 8)
#: Bit widths stored as plain floats, with no quantization constants.
PLAIN_BITS = (16, 32)

_OFFSET_BYTES = 4       # bitsandbytes' one float32 offset per double-quantized tensor


# ----------------------------------------------------------------------------- validation
def _power_of_two(value, name: str) -> int:
    value = check_count(value, name)
    if value & (value - 1):
        raise ValueError(f"{name} must be a positive power of two, got {value!r}")
    return value


def _check_storage(bits, blocksize, nested_blocksize, absmax_bits, nested_absmax_bits):
    if not is_int(bits) or bits not in BLOCKWISE_BITS + PLAIN_BITS:
        raise ValueError(f"bits must be one of {BLOCKWISE_BITS + PLAIN_BITS}, got {bits!r}")
    for value, name in ((absmax_bits, "absmax_bits"), (nested_absmax_bits, "nested_absmax_bits")):
        if check_count(value, name) % 8:
            raise ValueError(f"{name} must be a whole number of bytes (a multiple of 8), got {value!r}")
    return (_power_of_two(blocksize, "blocksize"), _power_of_two(nested_blocksize, "nested_blocksize"))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- one tensor
def bits_per_param(bits: int = 4, blocksize: int = 64, double_quant: bool = True,
                   nested_blocksize: int = 256, absmax_bits: int = 32,
                   nested_absmax_bits: int = 8) -> float:
    r"""Storage per weight, in bits, including the quantization constants.

    A blockwise code of :math:`k` bits stores one constant :math:`c_2` (the
    block's absmax) per block of :math:`B` weights. Kept as
    :math:`b_\mathrm{f}`-bit floats (float32) they cost

    .. math::

        b = k + \frac{b_\mathrm{f}}{B}.

    With double quantization the :math:`c_2` are themselves quantized to
    :math:`b_\mathrm{q}` bits (uint8) in blocks of :math:`B_{c_2}`, each such
    block keeping one :math:`b_\mathrm{f}`-bit second-level constant
    :math:`c_1` (the paper's names, see ``docs/notation.md``):

    .. math::

        b_{\mathrm{DQ}} = k + \frac{b_\mathrm{q}}{B} + \frac{b_\mathrm{f}}{B\,B_{c_2}}.

    This is the per-weight cost of a long tensor. Per-tensor terms, the one
    float32 offset of double quantization and the rounding up of a trailing
    partial block, shrink like :math:`1/n` and are left out here; use
    :func:`quantized_nbytes` for the exact bytes of a tensor.

    Parameters
    ----------
    bits : {4, 8, 16, 32}
        :math:`k`, bits per stored code: 4 (NF4 or FP4), 8 (blockwise 8-bit),
        or 16 / 32 (plain floats: no constants, the other arguments are only
        validated).
    blocksize : int
        :math:`B`, weights per constant :math:`c_2`; a positive power of two.
    double_quant : bool
        Quantize the :math:`c_2` (bitsandbytes' ``compress_statistics``).
    nested_blocksize : int
        :math:`B_{c_2}`, constants :math:`c_2` per second-level constant
        :math:`c_1`; a positive power of two.
    absmax_bits : int
        :math:`b_\mathrm{f}`, bits of a constant kept as a float (float32: 32):
        every :math:`c_2` without double quantization, every :math:`c_1` with it.
    nested_absmax_bits : int
        :math:`b_\mathrm{q}`, bits of a quantized :math:`c_2` (uint8: 8).

    Returns
    -------
    float
        Bits per weight.

    Examples
    --------
    >>> bits_per_param(double_quant=False)
    4.5
    >>> bits_per_param()  # NF4 as in QLoRA: 4 + 8/64 + 32/16384
    4.126953125
    >>> bits_per_param(bits=16)
    16.0
    """
    blocksize, nested_blocksize = _check_storage(bits, blocksize, nested_blocksize,
                                                 absmax_bits, nested_absmax_bits)
    if bits in PLAIN_BITS:
        return float(bits)
    if not double_quant:
        return bits + absmax_bits / blocksize  # eq. b: k + b_f / B
    return (bits + nested_absmax_bits / blocksize  # eq. b_DQ: k + b_q / B + b_f / (B B_c2)
            + absmax_bits / (blocksize * nested_blocksize))


def quantized_nbytes(n_params: int, bits: int = 4, blocksize: int = 64, double_quant: bool = True,
                     nested_blocksize: int = 256, absmax_bits: int = 32,
                     nested_absmax_bits: int = 8) -> int:
    r"""Exact bytes of one tensor of ``n_params`` elements, in bitsandbytes' layout.

    A trailing partial block is a block of its own, so with
    :math:`m = \lceil n / B \rceil` constants :math:`c_2` and
    :math:`\lceil m / B_{c_2} \rceil` constants :math:`c_1`

    .. math::

        \mathrm{bytes}(n) = \left\lceil \frac{n k}{8} \right\rceil
            + \begin{cases}
                m \, b_\mathrm{f} / 8 & \text{without double quantization} \\
                m \, b_\mathrm{q} / 8 + \lceil m / B_{c_2} \rceil \, b_\mathrm{f} / 8 + 4 & \text{with it}
              \end{cases}

    where the 4 is the float32 ``offset``. For :math:`k = 4` the first term is
    ``(n + 1) // 2``: two codes per byte, the last byte half empty when
    :math:`n` is odd. Plain 16/32-bit storage is just :math:`n k / 8`.

    Parameters
    ----------
    n_params : int
        Number of elements in the tensor, >= 1.
    bits, blocksize, double_quant, nested_blocksize, absmax_bits, nested_absmax_bits
        As in :func:`bits_per_param`.

    Returns
    -------
    int
        Bytes.

    Examples
    --------
    >>> quantized_nbytes(4096 * 4096)  # one 4096 x 4096 NF4 matrix
    8654852
    >>> quantized_nbytes(65, double_quant=False)  # 33 packed bytes + 2 float32 absmax
    41
    """
    n = check_count(n_params, "n_params")
    blocksize, nested_blocksize = _check_storage(bits, blocksize, nested_blocksize,
                                                 absmax_bits, nested_absmax_bits)
    codes = _ceil_div(n * bits, 8)  # matches bitsandbytes: 4-bit out has (n + 1) // 2 bytes
    if bits in PLAIN_BITS:
        return codes
    n_blocks = _ceil_div(n, blocksize)  # a trailing partial block is its own block
    if not double_quant:
        return codes + n_blocks * absmax_bits // 8
    n_nested_blocks = _ceil_div(n_blocks, nested_blocksize)
    return (codes + n_blocks * nested_absmax_bits // 8
            + n_nested_blocks * absmax_bits // 8 + _OFFSET_BYTES)
