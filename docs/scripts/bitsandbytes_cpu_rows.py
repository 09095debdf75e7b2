"""Where bitsandbytes' CPU dequantize_4bit and qlora_ref disagree, and by how much.

Run: ``python docs/scripts/bitsandbytes_cpu_rows.py`` (needs bitsandbytes, from the test extra).
The numbers depend on the host: the wrong path is taken only on CPUs with AVX-512.
"""
import numpy as np
import torch

import bitsandbytes.functional as F
import qlora_ref

print("torch reports:", torch.backends.cpu.get_cpu_capability())
for shape, blocksize in [((3, 16), 32), ((10, 96), 64), ((128, 128), 256), ((300, 400), 64),
                         ((4096, 4096), 64)]:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4",
                                    compress_statistics=False)
    theirs = F.dequantize_4bit(packed, state).numpy()
    ours = qlora_ref.dequantize_4bit(qlora_ref.from_bitsandbytes(packed, state))  # same bytes
    print(f"{str(shape):>12} blocksize {blocksize:>4}: max |error| "
          f"bitsandbytes {np.abs(theirs - x.numpy()).max():.3f}, "
          f"qlora_ref {np.abs(ours - x.numpy()).max():.3f}; "
          f"{np.mean(theirs != ours):.1%} of values differ")
