r"""Double quantization: quantize the quantization constants.

Paper section 3, "Double Quantization", in the paper's notation (one table
for the package: ``docs/notation.md``): :math:`c_2` are the constants of the
*first* quantization, one float32 absmax per block of :math:`B = 64`
weights, costing :math:`32/64 = 0.5` bits per parameter; :math:`c_1` are
the float32 constants of the *second* quantization, the one that quantizes
:math:`c_2`. QLoRA treats the :math:`c_2` as a second tensor to quantize:
subtract their mean (they are all positive, and a symmetric code wants
centred data), then quantize blockwise to 8 bits with blocksize
:math:`B_{c_2} = 256`, keeping one :math:`c_1` per 256 values of
:math:`c_2`:

.. math::

    \mu = \operatorname{mean}(c_2), \qquad
    (c_2^{\text{8-bit}}, c_1) = Q_{\text{blockwise}}^{256}(c_2 - \mu), \qquad
    \text{cost} = \frac{8}{64} + \frac{32}{64 \cdot 256} = 0.127 \text{ bits}

and dequantization, the inner ``dequant`` of the paper's equation (6),
:math:`\operatorname{doubleDequant}(c_1, c_2, \mathbf W) =
\operatorname{dequant}(\operatorname{dequant}(c_1, c_2), \mathbf W)`, is
:math:`\hat c_2 = \text{code}[c_2^{\text{8-bit}}] \cdot c_1 + \mu`.

Note (which 8-bit code): the paper says it stores :math:`c_2` as "8-bit
Floats" (:math:`c_2^{\text{FP8}}`) without naming a layout (E4M3, E5M2, ...).
The code here, like bitsandbytes' ``quantize_4bit``, which calls
``quantize_blockwise(absmax - offset, blocksize=256)`` with its default
table, uses the signed 8-bit *dynamic* map (:func:`qlora_ref.codebooks.dynamic_code`,
``create_dynamic_map(signed=True)``): a sign, an exponent written in unary
and a linear fraction, i.e. a float-like code whose exponent and fraction
widths vary from value to value. We follow bitsandbytes because this package
is byte-compatible with it (the same stored absmax codes, checked by the
parity tests), and the released QLoRA code double-quantizes through it.

Mirrors the ``compress_statistics=True`` branch of bitsandbytes'
``quantize_4bit`` and ``dequantize_4bit``.

Note (offset): bitsandbytes takes ``absmax.mean()`` in float32 with
torch's summation order. We sum in float64 and round once, the most
accurate float32 mean; the two can differ in the last bits (seen: 2 ulps;
the parity tests bound it by float32 summation error).
"""
from __future__ import annotations

import numpy as np

from .blockwise import dequantize_blockwise, quantize_blockwise
from .codebooks import dynamic_code
from .validation import check_finite_values

__all__ = ["NESTED_BLOCKSIZE", "double_quantize", "double_dequantize"]

#: Blocksize of the second quantization level (paper and bitsandbytes: 256).
NESTED_BLOCKSIZE = 256


def double_quantize(absmax: np.ndarray, nested_blocksize: int = NESTED_BLOCKSIZE
                    ) -> tuple[np.ndarray, np.ndarray, np.float32]:
    r"""Quantize the first-level constants :math:`c_2` (``absmax``, float32) to 8 bits.

    Returns
    -------
    absmax_codes : numpy.ndarray
        uint8, one per first-level block (:math:`c_2^{\text{8-bit}}`, indices into the dynamic map).
    nested_absmax : numpy.ndarray
        float32, one per ``nested_blocksize`` first-level blocks (:math:`c_1`).
    offset : numpy.float32
        :math:`\mu`, the mean of ``absmax``.
    """
    absmax = np.asarray(absmax, dtype=np.float32)
    offset = np.float32(np.mean(absmax, dtype=np.float64))           # mu
    centered = absmax - offset                                        # c2 - mu, float32 (n_blocks,)
    absmax_codes, nested_absmax = quantize_blockwise(centered, dynamic_code(), nested_blocksize)
    return absmax_codes, nested_absmax, offset


def double_dequantize(absmax_codes: np.ndarray, nested_absmax: np.ndarray, offset,
                      nested_blocksize: int = NESTED_BLOCKSIZE,
                      nested_code: np.ndarray | None = None) -> np.ndarray:
    r"""Recover the first-level constants: :math:`\hat c_2 = \text{code}[c_2^{\text{8-bit}}] \cdot c_1 + \mu`, float32.

    ``nested_code`` is the 8-bit table the codes index (default: :func:`dynamic_code`).
    """
    code = dynamic_code() if nested_code is None else nested_code
    check_finite_values(nested_absmax, "nested_absmax")     # a NaN would spread over 256 blocks
    with np.errstate(over="ignore"):                        # 1e39 is infinite in float32
        check_finite_values(np.float32(offset), "offset")
    centered = dequantize_blockwise(absmax_codes, nested_absmax, code, nested_blocksize)
    return centered + np.float32(offset)  # float32 add, as bitsandbytes' `absmax += offset`
