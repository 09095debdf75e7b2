r"""Blockwise absmax quantization: one scale per block of ``blocksize`` numbers.

Paper section 2, "Block-wise k-bit Quantization". A single outlier would
waste the whole code range if one constant scaled the entire tensor, so the
tensor is cut into independent blocks, each scaled by its own absolute
maximum:

.. math::

    c_b = \max_{i \in b} |x_i|, \qquad
    \mathbf{X}^{q}_i = \operatorname*{arg\,min}_j \left| \text{code}_j - x_i / c_b \right|, \qquad
    \hat x_i = \text{code}[\mathbf{X}^{q}_i] \cdot c_b .

Mirrors bitsandbytes' ``quantize_blockwise`` / ``dequantize_blockwise``
and the first half of ``quantize_4bit`` (its plain-torch CPU path reads
like this module). This is the readable reference; the Cython kernels in
:mod:`qlora_ref._kernels` compute the same bytes faster.

Note (reciprocal): like bitsandbytes' kernels we multiply by the float32
reciprocal :math:`1/c_b` instead of dividing; the two can differ in the
last bit, and only that bit decides a value lying within one ulp of a
decision boundary. (bitsandbytes' CPU path divides in the trailing partial
block; the parity tests bound that.)

Note (zero blocks and tiny blocks): an all-zero block has :math:`c_b = 0`,
and the two bitsandbytes paths we mirror treat it differently; we copy
each, so the bytes agree. The 4-bit path (:mod:`qlora_ref.fourbit`) scales
by :math:`1/\max(c_b, 10^{-38})`, so a zero block stores the code of 0 and
dequantizes to exact zeros, never NaN; the clamp also means a block of
float32 subnormals (:math:`c_b < 10^{-38}`) is scaled by :math:`10^{38}`
rather than :math:`1/c_b`: finite, but coarser. The 8-bit kernel
(:func:`quantize_blockwise`, used by double quantization) takes the plain
reciprocal and writes index 0 wherever :math:`x \cdot (1/c_b)` is not a
number, which includes every element of an all-zero block.
"""
from __future__ import annotations

import numpy as np

from .validation import as_float32_flat, check_code, check_finite_values, check_positive_int

__all__ = ["ABSMAX_FLOOR", "block_absmax", "nearest_code", "decision_boundaries",
           "quantize_blockwise", "scale_by_block", "dequantize_blockwise"]

#: Floor on c_b before 1/c_b (matches bitsandbytes: ``absmax.clamp(min=1e-38)``).
ABSMAX_FLOOR = np.float32(1e-38)


def _blocks(flat: np.ndarray, blocksize: int) -> np.ndarray:
    """View ``flat`` as rows of ``blocksize``, zero-padding a trailing partial block.

    A block longer than the data is one row of the data's length: the padding
    never exceeds the data, whatever ``blocksize`` is.
    """
    width = min(blocksize, max(flat.size, 1))
    n_blocks = -(-flat.size // width)
    padded = np.zeros(n_blocks * width, dtype=flat.dtype)
    padded[: flat.size] = flat
    return padded.reshape(n_blocks, width)  # (n_blocks, blocksize)


def block_absmax(flat: np.ndarray, blocksize: int) -> np.ndarray:
    r"""Per-block absolute maximum :math:`c_b = \max_{i \in b} |x_i|`, float32.

    A trailing partial block is its own block (matches bitsandbytes); the
    zero padding cannot change its maximum.
    """
    return np.abs(_blocks(flat, blocksize)).max(axis=1).astype(np.float32)  # (n_blocks,)


def decision_boundaries(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""Midpoints between neighbouring code values, and the sort order of the code.

    .. math::

        m_k = (s_k + s_{k+1}) / 2, \qquad s = \operatorname{sort}(\text{code})

    computed in float32 (as bitsandbytes does). ``order[k]`` is the index in
    ``code`` of the k-th smallest value; the sort is stable, so of two equal
    values (FP4's two zeros) the lower index comes first.
    """
    code = np.asarray(code, dtype=np.float32)
    order = np.argsort(code, kind="stable")
    s = code[order]
    return (s[:-1] + s[1:]) / np.float32(2.0), order  # (len-1,) float32, (len,)


def nearest_code(normalized: np.ndarray, code: np.ndarray) -> np.ndarray:
    r"""Index of the code value nearest to each entry of ``normalized``.

    A value's position among the sorted midpoints is its sorted code index:

    .. math::

        k(v) = \#\{\, j : m_j < v \,\}

    **Tie rule**: a value exactly on a midpoint goes to the *lower* code
    value (``searchsorted(..., side="left")``), as bitsandbytes' CPU path
    (``torch.bucketize``) and its CUDA NF4 kernel (``x > threshold``) do.

    Note (speed): for a 4-bit code :math:`k(v)` is counted as written, 15
    vectorised comparisons, several times faster than NumPy's binary search
    (``searchsorted``), which longer codes use. Both give the same integers
    for finite input.
    """
    midpoints, order = decision_boundaries(code)
    if len(midpoints) < 16:                                      # 4-bit codes
        position = np.zeros(np.shape(normalized), dtype=np.uint8)
        for m in midpoints:
            position += normalized > m                           # eq. k(v), one j at a time
    else:                                                        # e.g. the 8-bit dynamic code
        position = np.searchsorted(midpoints, normalized, side="left")  # eq. k(v)
    return order[position].astype(np.uint8)


def normalize(flat: np.ndarray, absmax: np.ndarray, blocksize: int,
              floor: float = ABSMAX_FLOOR) -> np.ndarray:
    r"""Scale each element into [-1, 1] by its block: :math:`x_i \cdot \operatorname{fl}(1 / \max(c_b, \text{floor}))`.

    The 4-bit path uses the floor ``1e-38``; the 8-bit kernel none
    (``floor=0``: a zero block's reciprocal is then infinite, see
    :func:`quantize_blockwise`).
    """
    with np.errstate(divide="ignore", over="ignore"):
        reciprocal = np.float32(1.0) / np.maximum(absmax, np.float32(floor))  # (n_blocks,) float32
    with np.errstate(invalid="ignore"):
        scaled = _blocks(flat, blocksize) * reciprocal[:, None]             # (n_blocks, blocksize)
    return scaled.reshape(-1)[: flat.size]                                  # (n,)


def quantize_blockwise(x: np.ndarray, code: np.ndarray, blocksize: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``x`` blockwise with absmax scaling to indices into ``code``.

    Parameters
    ----------
    x : numpy.ndarray
        float32 values, any shape (flattened in C order).
    code : numpy.ndarray
        The codebook, float32 values in [-1, 1] (any order; at most 256).
    blocksize : int
        Elements per block; the last block may be shorter.

    Returns
    -------
    codes : numpy.ndarray
        uint8 indices into ``code``, same shape as ``x``.
    absmax : numpy.ndarray
        float32, one per block: ``ceil(x.size / blocksize)``.
    """
    flat, shape, _ = as_float32_flat(x)
    blocksize = check_positive_int(blocksize, "blocksize")
    code = check_code(code, max_size=256)
    absmax = block_absmax(flat, blocksize)                   # c_b
    normalized = normalize(flat, absmax, blocksize, floor=0)  # x * fl(1 / c_b), no floor here
    codes = nearest_code(normalized, code)                   # (n,) uint8
    # matches bitsandbytes' 8-bit kernel: where x * (1/c_b) is not a number (0 * inf: an
    # all-zero block, or a zero in a block of subnormals whose reciprocal overflows) it
    # writes index 0; its value code[0] * c_b is still zero, as the input was
    codes[np.isnan(normalized)] = 0
    return codes.reshape(shape), absmax


def scale_by_block(values: np.ndarray, absmax: np.ndarray, blocksize: int) -> np.ndarray:
    r"""The multiply every dequantization ends with: :math:`\hat x_i = v_i \cdot c_b`, float32.

    ``values`` are code values (``code[q]``, in [-1, 1]), ``absmax`` one float32
    constant per block of ``blocksize``. No checks: this is exactly what the
    kernels compute; :func:`dequantize_blockwise` checks its arguments first.
    """
    scaled = _blocks(values, blocksize) * absmax[:, None]             # (n_blocks, blocksize)
    return scaled.reshape(-1)[: values.size]                          # (n,)


def dequantize_blockwise(codes: np.ndarray, absmax: np.ndarray, code: np.ndarray,
                         blocksize: int) -> np.ndarray:
    r"""Invert :func:`quantize_blockwise`: :math:`\hat x_i = \text{code}[q_i] \cdot c_b`, float32.

    A NaN or infinite constant is refused (``ValueError`` naming ``absmax``):
    it would turn its whole block into NaN or infinity without an error, and
    :func:`quantize_blockwise` never writes one for finite input.
    """
    codes = np.asarray(codes)
    blocksize = check_positive_int(blocksize, "blocksize")
    code = check_code(code, max_size=256)
    if codes.dtype != np.uint8 or codes.size == 0:
        raise ValueError(f"codes must be a non-empty uint8 array; got {codes.size} of {codes.dtype}")
    absmax = np.asarray(absmax)
    n_blocks = -(-codes.size // blocksize)
    if absmax.dtype != np.float32 or absmax.shape != (n_blocks,):
        raise ValueError(f"absmax must hold {n_blocks} float32 values (one per block of "
                         f"{blocksize}); got shape {absmax.shape} of {absmax.dtype}")
    check_finite_values(absmax, "absmax")
    if int(codes.max()) >= code.size:
        raise ValueError(f"codes index up to {int(codes.max())}, but the code has {code.size} values")
    values = code[codes.reshape(-1)]                                  # (n,) in [-1, 1]
    return scale_by_block(values, absmax, blocksize).reshape(codes.shape)
