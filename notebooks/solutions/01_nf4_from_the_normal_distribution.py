"""Solutions to the exercises of notebook 01 (NF4 from the normal distribution).

Each name here is the answer the notebook's check of the same name expects;
``QLORA_REF_SOLUTIONS=1`` makes the checks use them (see ``notebooks/exercises.py``).
"""
import numpy as np
from scipy.stats import norm

from qlora_ref.codebooks import NF4_OFFSET, linspace_float32


def nf_k(bits):
    """NF-k as bitsandbytes builds it: 2**(k-1) upper-half quantiles, 2**(k-1) - 1 lower, and 0.

    float32 probabilities (torch.linspace's steps, as bitsandbytes) and a float32 division make
    nf_k(4) identical to nf4_code(); np.linspace in float64 lands within 1.2e-7 of it.
    """
    half = 2 ** (bits - 1)
    positive = norm.ppf(linspace_float32(NF4_OFFSET, 0.5, half + 1)[:-1].astype(np.float64))
    negative = -norm.ppf(linspace_float32(NF4_OFFSET, 0.5, half)[:-1].astype(np.float64))
    levels = np.sort(np.concatenate([negative, [0.0], positive])).astype(np.float32)
    return levels / levels.max()


def median_block_absmax(blocksize):
    """P(max |X_i| <= m) = (2 Phi(m) - 1)**n = 1/2, solved for m."""
    return float(norm.ppf((1 + 0.5 ** (1 / blocksize)) / 2))


def lloyd_max(n_levels, iterations=400):
    """Lloyd's iteration for N(0, 1): cells between midpoints, each level the mean of its cell."""
    levels = norm.ppf((np.arange(n_levels) + 0.5) / n_levels)       # start from quantiles
    for _ in range(iterations):
        edges = np.concatenate([[-np.inf], (levels[1:] + levels[:-1]) / 2, [np.inf]])
        lo, hi = edges[:-1], edges[1:]
        levels = (norm.pdf(lo) - norm.pdf(hi)) / (norm.cdf(hi) - norm.cdf(lo))   # E[X | cell]
    return levels
