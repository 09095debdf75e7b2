"""``qlora-ref compare``: full FT vs LoRA vs QLoRA NF4/FP4/Int4, adapter placement, rank; over seeds.

The flags, their defaults and the work live with the experiment
(:func:`qlora_ref.train.compare.add_arguments` and :func:`~qlora_ref.train.compare.run`).
With ``--model DIR`` (or ``smollm2``) it is Table 3 in miniature on that model instead
(:func:`qlora_ref.train.real_compare.run`).
"""
from __future__ import annotations

HELP = ("full FT vs LoRA vs QLoRA NF4/FP4/Int4, all-linear vs attention-only, rank sweep; "
        "over seeds")


def add_arguments(parser):
    from ..train.compare import add_arguments as compare_arguments  # imports torch
    from ..train.real_compare import add_arguments as real_arguments

    compare_arguments(parser)
    parser.add_argument("--model", help="a local Hugging Face causal LM folder, or smollm2: run "
                        "Table 3 in miniature on it instead (QLoRA NF4 + DQ, FP4, 16-bit LoRA, "
                        "full fine-tuning; capitals task; qlora_ref.train.real_compare)")
    return real_arguments(parser)


def run(args) -> int:
    from .._atomic import refuse_inside_package
    from ..train.compare import run as compare_run

    if getattr(args, "output_dir", None):  # before the work: never inside the installed package
        refuse_inside_package(args.output_dir, "--output-dir")

    if getattr(args, "model", None):  # a real model: the Table 3 experiment
        from ..train.real_compare import run as real_run

        return real_run(args)
    return compare_run(args)
