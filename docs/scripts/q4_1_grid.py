"""What the Q4_1 origin of SmolLM2's "float" weights means for every 4-bit comparison on it.

Run: ``OMP_NUM_THREADS=1 python docs/scripts/q4_1_grid.py [--json docs/results/smollm2_q4_1_grid.json]``
(needs the ``real`` extra; converts the model once).

1. Distinct values per block: the projection weights were stored by llama.cpp
   as Q4_1 (blocks of 32 along a row, :math:`\\hat w = d q + m`, 4-bit q), so a
   block of 32 holds at most 16 distinct values and a block of 64 at most 32.
2. Re-quantization error: the relative mean squared error
   :math:`\\sum (w - \\hat w)^2 / \\sum w^2` of Int4, FP4 and NF4 (blocksize 64,
   no double quantization) on these weights, against the same on Gaussian
   weights of each tensor's shape and standard deviation (seed 0).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from safetensors.numpy import load_file

import qlora_ref
from qlora_ref.models import smollm2

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def distinct_per_block(w: np.ndarray, block: int) -> np.ndarray:
    """Number of distinct values in each aligned block of ``block`` along the rows."""
    blocks = np.sort(w.reshape(-1, block), axis=1)      # (n_blocks, block), rows hold whole blocks
    return 1 + np.count_nonzero(np.diff(blocks, axis=1), axis=1)


def rel_mse(w: np.ndarray, quant_type: str) -> tuple[float, float]:
    """(sum of squared errors, sum of squares) of a blocksize-64 round trip without DQ."""
    state = qlora_ref.quantize_4bit(w, quant_type=quant_type, blocksize=64, double_quant=False)
    err = qlora_ref.dequantize_4bit(state).astype(np.float64) - w
    return float(np.sum(err * err)), float(np.sum(w.astype(np.float64) ** 2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the numbers there")
    args = parser.parse_args(argv)
    tensors = load_file(str(smollm2() / "model.safetensors"))
    names = [k for k in tensors if k.endswith(".weight") and k.split(".")[-2] in PROJECTIONS]
    rng = np.random.default_rng(0)
    d32, d64 = [], []
    sums = {f"{src}/{qt}": [0.0, 0.0] for src in ("real", "gauss") for qt in ("int4", "fp4", "nf4")}
    for name in names:
        w = tensors[name]                                    # (out, in) float32
        d32.append(distinct_per_block(w, 32))
        d64.append(distinct_per_block(w, 64))
        g = (rng.standard_normal(w.shape) * w.std()).astype(np.float32)
        for qt in ("int4", "fp4", "nf4"):
            for src, x in (("real", w), ("gauss", g)):
                e, s = rel_mse(x, qt)
                sums[f"{src}/{qt}"][0] += e
                sums[f"{src}/{qt}"][1] += s
    d32, d64 = np.concatenate(d32), np.concatenate(d64)
    out = {"tensors": len(names), "parameters": int(sum(tensors[n].size for n in names)),
           "distinct_per_32": {"max": int(d32.max()), "mean": float(d32.mean()),
                               "share_at_most_16": float(np.mean(d32 <= 16))},
           "distinct_per_64": {"max": int(d64.max()), "mean": float(d64.mean()),
                               "share_at_most_32": float(np.mean(d64 <= 32))},
           "relative_mse_blocksize64": {k: v[0] / v[1] for k, v in sums.items()}}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        from qlora_ref._atomic import write_atomic

        write_atomic(args.json, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
