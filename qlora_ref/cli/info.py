"""``qlora-ref info`` (the default command): the NF4 table and a 4096x4096 quantization summary."""
from __future__ import annotations

import time

import numpy as np

HELP = "NF4 table and a 4096x4096 quantization summary (the default command)"
#: Shared flags it uses: --seed (the random matrix); it has no device and prints only its table.
COMMON = ("seed",)


def add_arguments(parser):
    parser.add_argument("--size", type=int, default=4096, help="matrix side (default 4096)")
    return parser


def run(args) -> int:
    from .. import active_backend, cython_available, dequantize_4bit, nf4_code, quantize_4bit
    from ..codebooks import normal_float_code
    from ..validation import check_matrix_side

    n = check_matrix_side(args.size, args.size)[0]  # 300000 would ask for 360 GB
    print("NF4 codebook (paper section 3; equal to bitsandbytes' table):")
    exact = normal_float_code(4, float32_steps=False)
    for i, (v, v64) in enumerate(zip(nf4_code(), exact)):
        print(f"  {i:2d}  0b{i:04b}  {v: .8f}   (float64 derivation {v64: .8f})")
    rng = np.random.default_rng(args.seed)
    w = rng.standard_normal((n, n), dtype=np.float32) * np.float32(0.02)
    backend = active_backend()
    status = ("built and in use" if backend == "cython"
              else "built, not in use" if cython_available() else "NOT built")
    print(f"\nQuantizing a random {n}x{n} float32 matrix (N(0, 0.02^2), seed {args.seed}) "
          f"with NF4, blocksize 64; backend: {backend} (Cython extension {status})")
    print(f"  {'double quant':<14}{'bits/param':>12}{'MSE':>14}{'max |error|':>14}"
          f"{'quantize s':>12}{'dequantize s':>14}")
    for dq in (False, True):
        t0 = time.perf_counter()
        state = quantize_4bit(w, "nf4", 64, double_quant=dq)
        t1 = time.perf_counter()
        w_hat = dequantize_4bit(state)
        t2 = time.perf_counter()
        err = w_hat - w
        print(f"  {str(dq):<14}{state.bits_per_param:>12.4f}{float(np.mean(err ** 2)):>14.4e}"
              f"{float(np.abs(err).max()):>14.4e}{t1 - t0:>12.3f}{t2 - t1:>14.3f}")
    print("\nDouble quantization: 32/64 = 0.5 bits of constants per parameter become "
          "8/64 + 32/(64*256) = 0.127 (paper: 0.373 bits saved).")
    return 0
