"""Solutions to the exercises of notebook 08, "Merging adapters" (checked by its check cells)."""
import numpy as np
import torch

import qlora_ref


def nf4_codes(weight):
    """Exercise 1. Blocks of 64 along the flattened weight, each divided by its absmax, then the
    index of the nearest of the 16 NF4 levels."""
    blocks = torch.as_tensor(weight, dtype=torch.float32).reshape(-1, 64)   # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)                          # (n_blocks, 1) c_b
    levels = torch.tensor(qlora_ref.nf4_code(), dtype=torch.float32)         # (16,)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))        # an all-zero block: 0 / 1
    distance = ((blocks / absmax).unsqueeze(-1) - levels).abs()              # (n_blocks, 64, 16)
    return distance.argmin(dim=-1).reshape(-1).numpy().astype(np.uint8)


#: Exercise 2. bfloat16 keeps 8 significant bits (7 stored), so neighbouring values are
#: 2**-7 apart relative to the leading bit, and rounding to nearest is off by at most half of that.
bf16_relative_error_bound = 2.0 ** -8

def requantize_error(w_hat, delta, x):
    """Exercise 3. The "requantize" merge stores Ŵ + ΔW in NF4 again: blocks of 64 with their own
    absmax (a new one: the update changes the block's largest value), each value the nearest level.
    Its output error against the unmerged layer, relative to the unmerged output:

        ‖x W'ᵀ - x (Ŵ + ΔW)ᵀ‖ / ‖x (Ŵ + ΔW)ᵀ‖,  W' = dequant(Q(Ŵ + ΔW)).
    """
    merged = w_hat + delta                                                   # (out, in) float32
    blocks = merged.reshape(-1, 64)                                          # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)                          # (n_blocks, 1)
    levels = torch.tensor(qlora_ref.nf4_code(), dtype=merged.dtype)          # (16,)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))         # an all-zero block: 0 / 1
    codes = ((blocks / scale).unsqueeze(-1) - levels).abs().argmin(dim=-1)   # (n_blocks, 64)
    requantized = (levels[codes] * absmax).reshape(merged.shape)            # (out, in) W'
    y = x @ merged.T                                                         # (n, out) unmerged
    return float((x @ requantized.T - y).norm() / y.norm())
