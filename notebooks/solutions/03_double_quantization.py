"""Solutions to the exercises of notebook 03 (double quantization).

Each name here is the answer the notebook's check of the same name expects;
``QLORA_REF_SOLUTIONS=1`` makes the checks use them (see ``notebooks/exercises.py``).
"""


def dq_bits_per_param(b1, b2):
    """4-bit codes, one 8-bit c2 per b1 weights, one float32 c1 per b1 * b2 weights."""
    return 4 + 8 / b1 + 32 / (b1 * b2)


def n_c1(shape):
    """One c1 per 256 first-level blocks; partial blocks count at both levels."""
    n = 1
    for d in shape:
        n *= d
    n_c2 = -(-n // 64)              # ceil: a trailing partial block is a block
    return -(-n_c2 // 256)


def equivalent_blocksize(b1, b2):
    """Solve 32 / B = 8 / b1 + 32 / (b1 * b2) for B."""
    return 32 / (8 / b1 + 32 / (b1 * b2))
