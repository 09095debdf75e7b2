"""``qlora-ref pretrain``: rebuild the tiny base GPT the package ships.

The flags and their defaults live with the training code
(:func:`qlora_ref.train.pretrain.add_arguments`), so that
``python -m qlora_ref.train.pretrain`` and this command cannot drift apart.
"""
from __future__ import annotations

HELP = ("pretrain the tiny base GPT (the shipped model is this command's output with the "
        "defaults)")


def add_arguments(parser):
    from ..train.pretrain import add_arguments as pretrain_arguments  # imports torch

    return pretrain_arguments(parser)


def run(args) -> int:
    from ..train.pretrain import run as pretrain_run

    return pretrain_run(args)
