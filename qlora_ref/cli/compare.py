"""``qlora-ref compare``: full FT vs LoRA vs QLoRA NF4/FP4/Int4, adapter placement, rank; over seeds.

The flags, their defaults and the work live with the experiment
(:func:`qlora_ref.train.compare.add_arguments` and :func:`~qlora_ref.train.compare.run`).
"""
from __future__ import annotations

HELP = ("full FT vs LoRA vs QLoRA NF4/FP4/Int4, all-linear vs attention-only, rank sweep; "
        "over seeds")


def add_arguments(parser):
    from ..train.compare import add_arguments as compare_arguments  # imports torch

    return compare_arguments(parser)


def run(args) -> int:
    from ..train.compare import run as compare_run

    return compare_run(args)
