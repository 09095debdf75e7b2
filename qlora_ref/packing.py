r"""Nibble packing: two 4-bit codes in one byte.

bitsandbytes' layout: element ``2i`` goes to the high nibble and element
``2i + 1`` to the low nibble of byte ``i``::

    codes:   [ a ][ b ][ c ][ d ][ e ]
    bytes:   [ a | b ][ c | d ][ e | p ]     (high | low nibble)

An odd count leaves the last low nibble ``p`` as padding; the caller
chooses its value (bitsandbytes pads the *input* with 0.0, so the pad
nibble is the code of zero: 7 for NF4, 0 for FP4).

.. math::

    \text{byte}_i = 16\, q_{2i} + q_{2i+1}

The Cython twins are ``pack_nibbles`` / ``unpack_nibbles`` in
:mod:`qlora_ref._kernels.quant4`.
"""
from __future__ import annotations

import numpy as np

__all__ = ["pack_nibbles", "unpack_nibbles"]


def pack_nibbles(codes: np.ndarray, pad: int = 0) -> np.ndarray:
    """Pack 4-bit codes (uint8 values 0..15) two per byte; an odd tail is padded with ``pad``."""
    codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(pad))
    pairs = codes.reshape(-1, 2)                                      # (n_bytes, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).astype(np.uint8)       # eq. byte_i


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: the first ``n`` codes as uint8."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    pairs = np.stack([packed >> 4, packed & 0x0F], axis=1)           # (n_bytes, 2)
    return pairs.reshape(-1)[:n]
