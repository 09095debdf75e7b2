r"""Nibble packing: two 4-bit codes in one byte.

bitsandbytes' layout: element ``2i`` goes to the high nibble and element
``2i + 1`` to the low nibble of byte ``i``::

    codes:   [ a ][ b ][ c ][ d ][ e ]
    bytes:   [ a | b ][ c | d ][ e | p ]     (high | low nibble)

An odd count leaves the last low nibble ``p`` as padding; the caller
chooses its value (bitsandbytes pads the *input* with 0.0, so the pad
nibble is the code of zero: 7 for NF4, 0 for FP4). Codes and the pad must
be 0..15; anything else raises ``ValueError`` here and in the Cython twins.

.. math::

    \text{byte}_i = 16\, q_{2i} + q_{2i+1}

The Cython twins are ``pack_nibbles`` / ``unpack_nibbles`` in
:mod:`qlora_ref._kernels.quant4`.
"""
from __future__ import annotations

import operator

import numpy as np

__all__ = ["pack_nibbles", "unpack_nibbles"]


def _checked_pad(pad) -> int:
    """``pad`` as an int 0..15; the Cython twin applies the same rule (``_checked_pad``)."""
    try:
        value = operator.index(pad)
    except TypeError:
        value = None
    if value is None or isinstance(pad, bool) or not 0 <= value <= 15:
        raise ValueError(f"pad must be a 4-bit code, an integer from 0 to 15; got {pad!r}")
    return value


def pack_nibbles(codes: np.ndarray, pad: int = 0) -> np.ndarray:
    """Pack 4-bit codes (integers 0..15) two per byte; an odd tail is padded with ``pad``.

    Raises ``ValueError`` for a code or a ``pad`` outside 0..15: a larger
    value would spill into the neighbouring nibble (``[16, 1]`` packed to
    ``[1]``), and a pad of 0x23 gave byte 0xf3 here but 0x73 in the kernel.
    """
    pad = _checked_pad(pad)
    codes = np.asarray(codes).reshape(-1)
    if codes.size and codes.dtype.kind not in "ui":
        raise ValueError(f"codes must be 4-bit codes, integers from 0 to 15; got dtype "
                         f"{codes.dtype}")
    if codes.size and (codes.max() > 15 or (codes.dtype.kind == "i" and codes.min() < 0)):
        bad = codes[(codes < 0) | (codes > 15)]
        raise ValueError(f"codes must be 4-bit codes, integers from 0 to 15; got {bad.size} "
                         f"outside that range, e.g. {bad[:3].tolist()}")
    codes = codes.astype(np.uint8, copy=False)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(pad))
    pairs = codes.reshape(-1, 2)                                      # (n_bytes, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).astype(np.uint8)       # eq. byte_i


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: the ``n`` codes as uint8.

    ``packed`` must hold exactly ``ceil(n / 2)`` bytes (else ``ValueError``,
    as in the Cython twin); a shorter one used to give fewer than ``n`` codes.
    """
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:  # [300] would overflow a cast; floats would be truncated
        if packed.size == 0 and packed.dtype.kind in "iuf":
            pass  # [] is float64 to NumPy, and no bytes at all
        elif packed.dtype.kind not in "iu" or not (0 <= packed.min() and packed.max() <= 255):
            raise ValueError(f"packed must be bytes (uint8, or integers 0..255); got "
                             f"{packed.size} value(s) of {packed.dtype}")
        packed = packed.astype(np.uint8)
    packed = packed.reshape(-1)
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"n must be a non-negative integer; got {n!r}")
    n = int(n)
    if n < 0 or packed.size != (n + 1) // 2:
        raise ValueError(f"packed has length {packed.size}; expected ceil(n / 2) = "
                         f"ceil({n} / 2) = {(n + 1) // 2} bytes, two 4-bit codes per byte")
    pairs = np.stack([packed >> 4, packed & 0x0F], axis=1)           # (n_bytes, 2)
    return pairs.reshape(-1)[:n]
