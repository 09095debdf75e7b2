"""``qlora-ref datatypes``: held-out loss with Int4 / FP4 / NF4 weights, ± double quantization.

The miniature of the paper's comparison of data types (Table 2), without
fine-tuning: on the shipped tiny GPT (answer-token loss), or with
``--model DIR`` / ``--model smollm2`` on a real Hugging Face causal LM
(perplexity on the pinned licence texts, beside bitsandbytes' NF4 and FP4).
The flags, their defaults and the work live with the experiment
(:func:`qlora_ref.train.datatypes.add_arguments` and :func:`~qlora_ref.train.datatypes.run`).
"""
from __future__ import annotations

HELP = ("loss of the tiny GPT, or perplexity of --model DIR|smollm2, with Int4/FP4/NF4 weights "
        "± double quantization, no fine-tuning")
#: Shared flags it uses: --quiet (progress lines); it runs on the CPU and draws no random numbers.
COMMON = ("quiet",)


def add_arguments(parser):
    from ..train.datatypes import add_arguments as datatypes_arguments  # imports torch

    return datatypes_arguments(parser)


def run(args) -> int:
    from ..train.datatypes import run as datatypes_run

    return datatypes_run(args)
