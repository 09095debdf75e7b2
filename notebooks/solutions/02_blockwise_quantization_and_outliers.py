"""Solutions to the exercises of notebook 02 (blockwise quantization and outliers).

Each name here is the answer the notebook's check of the same name expects;
``QLORA_REF_SOLUTIONS=1`` makes the checks use them (see ``notebooks/exercises.py``).
"""
import numpy as np

from qlora_ref import nf4_code


def error_bound(code, absmax):
    """Half the widest gap between neighbouring levels, times the block's absmax.

    Nothing lies outside [-absmax, absmax] (the absmax itself maps to +-1, a level), so the
    worst value sits halfway across the widest gap.
    """
    return float(absmax * np.diff(np.sort(np.asarray(code, np.float64))).max() / 2)


def _worst_block():
    code = nf4_code().astype(np.float64)
    j = int(np.argmax(np.diff(code)))                  # the widest gap: code[j] .. code[j + 1]
    x = np.zeros(64, np.float32)
    x[0] = 1.0                                         # the absmax: fixes the scale at 1
    x[1] = (code[j] + code[j + 1]) / 2                 # halfway across the widest gap
    return x


worst_block = _worst_block()


def outlier_neighbours(x, blocksize, threshold):
    """Ordinary values (|x| <= threshold) in blocks that hold at least one larger value."""
    flat = np.abs(np.asarray(x).ravel()) > threshold
    n_blocks = -(-flat.size // blocksize)
    padded = np.zeros(n_blocks * blocksize, bool)
    padded[:flat.size] = flat
    blocks = padded.reshape(n_blocks, blocksize)                   # (n_blocks, blocksize)
    sizes = np.minimum(blocksize, flat.size - np.arange(n_blocks) * blocksize)   # the last may be partial
    has_outlier = blocks.any(axis=1)
    return int((sizes - blocks.sum(axis=1))[has_outlier].sum())
