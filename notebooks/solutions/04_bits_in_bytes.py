"""Solutions to the exercises of notebook 04 (bits in bytes).

Each name here is the answer the notebook's check of the same name expects;
``QLORA_REF_SOLUTIONS=1`` makes the checks use them (see ``notebooks/exercises.py``).
"""
import numpy as np

from qlora_ref import nf4_code


def dequantize_nf4(packed, absmax, n):
    """Unpack (high nibble first), drop the pad, look each code up in NF4, times its block's absmax."""
    packed = np.asarray(packed, np.uint8)
    codes = np.stack([packed >> 4, packed & 0x0F], axis=1).reshape(-1)[:n]   # (n,) element 2j high
    scale = np.repeat(np.asarray(absmax, np.float32), 64)[:n]                # (n,) c2 of each element
    return nf4_code()[codes] * scale


def state_nbytes(n):
    """Packed codes + uint8 c2 per 64 weights + float32 c1 per 256 c2 + one float32 offset."""
    packed = (n + 1) // 2                     # two codes per byte, an odd tail padded
    n_c2 = -(-n // 64)                        # one uint8 code per first-level block
    n_c1 = -(-n_c2 // 256)                    # one float32 per 256 first-level blocks
    return packed + n_c2 + 4 * n_c1 + 4       # + the float32 offset (mean of c2)


def pack(codes, pad):
    codes = np.asarray(codes, np.uint8)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(pad))
    pairs = codes.reshape(-1, 2)                                  # (n_bytes, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).astype(np.uint8)    # first element high
