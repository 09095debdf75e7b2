"""``qlora-ref bench``: speed of the NumPy, Cython and bitsandbytes storage paths (arguments only).

Also ``python -m qlora_ref.cli.bench``, which is also the measuring child
process of a heap-reuse run (``--report-json FILE``). The tables, the method
and the timing are in :mod:`qlora_ref.bench`.
"""
from __future__ import annotations

import argparse
import sys

from ..bench import (CONTENTION_SETUPS, OPERATIONS, contention_table,  # noqa: F401  (importable here)
                     machine_info, process_settings, process_settings_now, qlora_layer_step_time,
                     run_benchmarks)
from ..bench.storage import check_options, run_here
from ..bench.timing import reuse_heap_memory as _reuse_heap_memory
from ..validation import MAX_THREADS, check_int_range, check_matrix_side

__all__ = ["run_benchmarks", "qlora_layer_step_time", "contention_table", "add_arguments", "main",
           "process_settings", "process_settings_now", "OPERATIONS", "CONTENTION_SETUPS"]


def _parse_size(text: str) -> tuple[int, int]:
    parts = str(text).lower().replace("*", "x").split("x")
    if len(parts) == 1:
        parts = parts * 2
    try:
        rows, cols = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--size wants N or RxC with integer sides, got {text!r}") from None
    return check_matrix_side(rows, cols)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add this benchmark's options to ``parser`` (for the ``qlora-ref bench`` subcommand)."""
    parser.add_argument("--size", nargs="+", default=None, metavar="N|RxC",
                        help="matrix sizes (default: 4096 256, i.e. 4096x4096 and 256x256)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of the multi-threaded rows (default: all cores)")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs, best kept (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="a fast look: 3 runs, sizes 1024 and 256, no layer timing")
    parser.add_argument("--no-layer", action="store_true",
                        help="skip the LoRA layer forward/backward timing")
    parser.add_argument("--format", choices=("text", "md"), default="text",
                        help="plain text or Markdown tables")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the matrices")
    parser.add_argument("--contention", nargs="?", type=int, const=2, default=None,
                        metavar="BUSY", help="instead of the tables: finetune and 1- vs 2-thread "
                        "kernels while BUSY (default 2) busy processes of the benchmark's own "
                        "load the CPUs, for each OpenMP setup (a few minutes)")
    parser.add_argument("--generate", action="store_true",
                        help="the generate table instead: decoding speed of a 4096x4096 layer "
                             "(1 and 8 tokens) and of two small models, 4-bit vs 16/32-bit, "
                             "on one thread (see qlora_ref/bench/generate.py)")
    parser.add_argument("--model", default=None, metavar="DIR|smollm2",
                        help="with --generate: greedy decoding of this Hugging Face model "
                             "(32 tokens, 1 and 2 threads) ours 4-bit vs bitsandbytes 4-bit, "
                             "float32 and bfloat16, with bytes per token and the bandwidth limit")
    parser.add_argument("--fresh-pages", action="store_true",
                        help="do not set glibc to reuse heap memory: outputs may be new, "
                             "page-faulted memory (as in a fresh process)")
    return parser


def main(args=None) -> int:
    """Run from ``python -m qlora_ref.cli.bench`` (argv list or None) or a parsed ``Namespace``."""
    if not isinstance(args, argparse.Namespace):
        parser = add_arguments(argparse.ArgumentParser(
            prog="python -m qlora_ref.cli.bench", description=__doc__.split("\n\n")[0]))
        parser.add_argument("--report-json", help=argparse.SUPPRESS)  # the measuring child
        args = parser.parse_args(args)
    if args.contention is not None:
        check_int_range(args.contention, "--contention (busy processes)", 0, MAX_THREADS)
        contention_table(busy=args.contention, fmt=args.format)
        return 0
    if getattr(args, "model", None) is not None and not args.generate:
        raise ValueError("--model is for the decoding table: add --generate")
    if args.generate:
        from ..bench.generate import generate_table, real_model_table

        if args.model is not None:
            real_model_table(args.model, fmt=args.format, repeat=3 if args.quick else args.repeat)
            return 0
        generate_table(fmt=args.format, repeat=3 if args.quick else max(args.repeat, 5),
                       size=1024 if args.quick else 4096)
        return 0
    check_options(args.threads, args.repeat, args.warmup)
    sizes = [_parse_size(s) for s in args.size or (["1024", "256"] if args.quick else ["4096", "256"])]
    repeat = 3 if args.quick else args.repeat
    options = dict(sizes=sizes, threads=args.threads, repeat=repeat, warmup=args.warmup,
                   seed=args.seed, layer=not (args.no_layer or args.quick), fmt=args.format)
    report_json = getattr(args, "report_json", None)
    if report_json:  # this is the child: a process of its own, so the allocator may change
        import json

        report = run_here(**options, file=sys.stdout, heap_reuse=_reuse_heap_memory())
        with open(report_json, "w") as f:
            json.dump(report, f)
        return 0
    run_benchmarks(**options, fresh_pages=args.fresh_pages)
    return 0


#: For ``qlora-ref``: the one-line help; the benchmark has its own ``--seed`` and no ``--device``.
HELP = "quantize/dequantize/pack speed: NumPy, Cython (1 and all threads), bitsandbytes, memory copy"
COMMON = ()
run = main


if __name__ == "__main__":
    raise SystemExit(main())
