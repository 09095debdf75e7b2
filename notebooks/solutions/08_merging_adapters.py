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

#: Exercise 3. Each float32 addition rounds; (w + d) - d loses the low bits of w whenever d is
#: large next to w's last bits, so some elements come back different.
subtracting_restores_exactly = False
