"""The ``qlora-ref`` command line (also ``python -m qlora_ref``).

With no subcommand it prints the quantization summary (``info``).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

__all__ = ["main", "build_parser"]


def _info(args) -> int:
    from . import active_backend, cython_available, dequantize_4bit, nf4_code, quantize_4bit
    from .codebooks import normal_float_code

    print("NF4 codebook (paper section 3; equal to bitsandbytes' table):")
    exact = normal_float_code(4, float32_steps=False)
    for i, (v, v64) in enumerate(zip(nf4_code(), exact)):
        print(f"  {i:2d}  0b{i:04b}  {v: .8f}   (float64 derivation {v64: .8f})")
    rng = np.random.default_rng(args.seed)
    n = args.size
    w = rng.standard_normal((n, n), dtype=np.float32) * np.float32(0.02)
    backend = active_backend()
    print(f"\nQuantizing a random {n}x{n} float32 matrix (N(0, 0.02^2), seed {args.seed}) "
          f"with NF4, blocksize 64; backend: {backend} "
          f"(Cython extension {'built and in use' if backend == 'cython' else 'built' if cython_available() else 'NOT built'})")
    print(f"  {'double quant':<14}{'bits/param':>12}{'MSE':>14}{'max |error|':>14}{'quant s':>10}{'dequant s':>11}")
    for dq in (False, True):
        t0 = time.perf_counter()
        state = quantize_4bit(w, "nf4", 64, double_quant=dq)
        t1 = time.perf_counter()
        w_hat = dequantize_4bit(state)
        t2 = time.perf_counter()
        err = w_hat - w
        print(f"  {str(dq):<14}{state.bits_per_param:>12.4f}{float(np.mean(err ** 2)):>14.4e}"
              f"{float(np.abs(err).max()):>14.4e}{t1 - t0:>10.3f}{t2 - t1:>11.3f}")
    print("\nDouble quantization saves "
          f"{4.5 - quantize_4bit(w[:64], 'nf4', 64, True).bits_per_param:.3f} bits/param on this slice; "
          "asymptotically 0.5 - 0.127 = 0.373 (paper).")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-ref",
        description="QLoRA, readable and exact: NF4 quantization, LoRA on a 4-bit base.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="print the NF4 table and the error and bits/param of "
                                       "quantizing a random matrix (the default command)")
    info.add_argument("--size", type=int, default=4096, help="matrix side (default 4096)")
    info.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["info", *argv]
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"qlora-ref: error: {exc}", file=sys.stderr)
        return 2
