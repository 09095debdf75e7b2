"""Is the order of Int4, FP4 and NF4 on SmolLM2 the same in every window, or an average of mixed signs?

Run: ``OMP_NUM_THREADS=2 python docs/scripts/smollm2_windows.py --json docs/results/smollm2_windows.json``
(needs the ``real`` extra). Scores the three 4-bit types without double
quantization (blocksize 64, this package's quantization) on the same 32
windows as ``qlora-ref datatypes --model smollm2`` and counts, window by
window, which type has the lower summed NLL, and the paired difference in
NLL per token (mean over windows and its standard error).
``--summarize docs/results/smollm2_windows.json`` prints the same from a
stored run without scoring again.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys

from qlora_ref.models import smollm2
from qlora_ref.train.datatypes import REAL_ROWS, real_datatype_table

NAMES = ("Int4", "FP4", "NF4")


def paired(nll: dict, tokens_per_window: int = 511) -> dict:
    """Per pair: windows where the first is lower, and the mean paired NLL/token difference ± s.e."""
    out = {}
    for a, b in itertools.combinations(NAMES, 2):
        diff = [(x - y) / tokens_per_window for x, y in zip(nll[a], nll[b])]
        se = statistics.stdev(diff) / math.sqrt(len(diff))
        out[f"{a} - {b}"] = {"windows_where_lower": f"{sum(d < 0 for d in diff)} of {len(diff)}",
                             "mean_nats_per_token": round(statistics.mean(diff), 4),
                             "standard_error": round(se, 4)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the per-window NLL and the counts there")
    parser.add_argument("--summarize", metavar="JSON", help="read a stored run instead of scoring")
    args = parser.parse_args(argv)
    if args.summarize:
        with open(args.summarize, encoding="utf-8") as f:
            stored = json.load(f)
        print(json.dumps(paired(stored["window_nll"]), indent=1))
        return 0
    rows = [r for r in REAL_ROWS if r[0] in NAMES]
    table = real_datatype_table(smollm2(), rows=rows, log=lambda s: print(s, file=sys.stderr))
    nll = {r["name"]: r["window_nll"] for r in table["rows"]}
    out = {"perplexity": {r["name"]: r["perplexity"] for r in table["rows"]},
           "paired": paired(nll), "window_nll": nll}
    print(json.dumps({k: out[k] for k in ("perplexity", "paired")}, indent=1))
    if args.json:
        from qlora_ref._atomic import write_atomic

        write_atomic(args.json, json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
