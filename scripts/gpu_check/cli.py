"""The GPU check's command line: flags, the checks on them, and the loop over the parts."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .context import Context
from .parts import PART_BY_KEY, PARTS, TOTAL_LIMIT_S
from .run import earlier_result, not_started, run_part_here, run_part_subprocess
from .summary import exit_status, write_summary

PROG = "gpu_check"
EPILOG = (
    "parts (each writes OUT/<folder>/result.json, result.md, log.txt):\n"
    + "\n".join(f"  ({p.key}) {p.folder + '/':<17} {p.title}" for p in PARTS)
    + "\n\nOUT/summary.md states each target and whether it was met.\n\n"
      "examples:\n"
      "  python scripts/gpu_check --out runs/gpu_check          # on a GPU, < 8 min\n"
      "  python scripts/gpu_check --out /tmp/g --device cpu --dry-run   # CI\n"
      "  python scripts/gpu_check --out runs/gpu_check --parts b,d      # a rerun\n\n"
      "exit status: 0 every part ran or was skipped for a stated reason (and no CUDA test "
      "failed); 1 a part failed or timed out, or a CUDA test failed; 2 bad usage, e.g. CUDA "
      "asked for but absent.")


def build_parser() -> argparse.ArgumentParser:
    limits = ", ".join(f"({p.key}) {p.timeout_s} s" for p in PARTS)
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="On a GPU: the CUDA parity tests, a layer benchmark against bitsandbytes + "
                    "PEFT, qlora-ref finetune on the device, a ~1B Llama's memory against "
                    "qlora-ref memory's prediction, SmolLM2-135M QLoRA training and decoding "
                    "against bitsandbytes + PEFT, and FSDP2 at world size 1, each part in its "
                    f"own subprocess with its own time limit ({limits}).")
    parser.add_argument("--out", default="runs/gpu_check",
                        help="output folder (default: runs/gpu_check)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="where to run (default: cuda); cpu needs --dry-run")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes (256x256 layer, 2-step finetune, 2-layer Llamas): checks "
                             "that every part runs, judges no target")
    parser.add_argument("--parts", default="".join(PART_BY_KEY),
                        help="which parts to run, e.g. 'a,c' (default: all); the summary "
                             "keeps the other parts' results from an earlier run into --out")
    parser.add_argument("--timeout-scale", type=float, default=1.0,
                        help="multiply every part's time limit and the total limit (default 1)")
    parser.add_argument("--total-limit", type=float, default=TOTAL_LIMIT_S,
                        help=f"seconds for all parts together (default {TOTAL_LIMIT_S}): a part "
                             "gets at most what is left, and none starts once it is spent")
    parser.add_argument("--part-here", choices=tuple(PART_BY_KEY), help=argparse.SUPPRESS)
    return parser


def _cuda_available() -> bool:
    import torch  # only here: a CPU dry run's driver need not pay for importing torch

    return torch.cuda.is_available()


def _usage_error(parser, args):
    """The one line that refuses bad usage (argparse's own for bad values), or None."""
    keys = [k for k in args.parts.replace(",", "") if k.strip()]
    if (not keys or any(k not in PART_BY_KEY for k in keys) or not args.timeout_scale > 0
            or not args.total_limit > 0):
        parser.error(f"--parts must be letters from {''.join(PART_BY_KEY)}, --timeout-scale and "
                     f"--total-limit positive, got {args.parts!r}, {args.timeout_scale!r} and "
                     f"{args.total_limit!r}")
    if args.device == "cpu" and not args.dry_run:
        return f"{PROG}: error: --device cpu runs only with --dry-run (the full sizes need a GPU)"
    if args.device == "cuda" and not _cuda_available():
        return (f"{PROG}: error: no CUDA GPU (torch.cuda.is_available() is False); "
                "without one, run `--device cpu --dry-run`")
    return None


def run_parts(args, out: Path, keys: list) -> dict:
    """Each chosen part in its own process, within the total limit; the others' earlier results."""
    started, results = time.perf_counter(), {}
    total_s = args.total_limit * args.timeout_scale
    for part in PARTS:
        key = part.key
        if key not in keys:  # a rerun of some parts keeps the others' results in the summary
            earlier = earlier_result(part, args, out)
            if earlier is not None:
                results[key] = earlier
            continue
        print(f"({key}) {part.title} ...", flush=True)
        left = total_s - (time.perf_counter() - started)
        if left < 1:
            results[key] = not_started(part, args, out, total_s)
        else:
            results[key] = run_part_subprocess(part, args, out,
                                               min(part.timeout_s * args.timeout_scale, left))
        r = results[key]
        print(f"({key}) {r['status']} in {r['wall_seconds']:.0f} s"
              + (f": {r.get('error') or r.get('reason')}" if r["status"] != "ok" else ""),
              flush=True)
    return results


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if args.part_here:  # a child started by run_part_subprocess
        return run_part_here(args.part_here, Context(out / PART_BY_KEY[args.part_here].folder,
                                                     args.device, args.dry_run))
    error = _usage_error(parser, args)
    if error:
        print(error, file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = run_parts(args, out, [k for k in args.parts.replace(",", "") if k.strip()])
    summary = write_summary(out, results, args, time.perf_counter() - started)
    for t in summary["targets"]:
        print(f"{t['target']} {t['verdict']}: {t['measured']}")
    print(f"summary: {out / 'summary.md'}")
    return exit_status(results)
