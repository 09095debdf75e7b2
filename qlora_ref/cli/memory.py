"""``qlora-ref memory N``: fine-tuning memory, full 16-bit vs LoRA vs QLoRA, for an N-parameter model."""
from __future__ import annotations

import argparse

HELP = "fine-tuning memory: full 16-bit vs LoRA vs QLoRA for an N-parameter model"
#: Shared flags it uses: --quiet (--model smollm2's one-time conversion); it runs nothing, so no --device or --seed.
COMMON = ("quiet",)


def add_arguments(parser):
    parser.add_argument("n_params", type=_parse_count, metavar="N", nargs="?",
                        help="parameters, e.g. 65e9 or 7B (default with --preset: the model's)")
    parser.add_argument("--preset", choices=["llama-7b", "llama-13b", "llama-33b", "llama-65b"],
                        help="a LLaMA of the paper's Figure 6: LoRA on all 7 projections of every "
                             "layer, and the shapes --seq-len needs")
    parser.add_argument("--r", type=int, default=64, help="LoRA rank for --preset (default 64)")
    parser.add_argument("--lora-params", type=_parse_count,
                        help="LoRA parameters (default 0.2%% of N, or the preset's count)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence: adds the activations "
                        "training keeps (needs --preset for the model's shapes; default: none)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="sequences per step, for the activations (default 1)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="keep only each layer's input and recompute the rest in backward")
    parser.add_argument("--shards", type=int, nargs="*", metavar="N",
                        help="per-GPU memory under FSDP2 for these GPU counts (no value: "
                             "1 2 4 8); needs --preset or --model")
    parser.add_argument("--model", metavar="DIR",
                        help="a local Hugging Face model folder: its config.json gives the shapes")
    return parser


def _parse_count(text: str) -> int:
    suffixes = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * suffixes[t[-1]] if t and t[-1] in suffixes else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r} (try 65e9 or 7B)")
    if not 1 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"a parameter count must be a finite number of at "
                                         f"least 1, got {text!r}")
    return int(round(value))


def run(args) -> int:
    from .. import memory

    if getattr(args, "model", None) and args.preset:
        raise ValueError("give --preset or --model, not both")
    shape = (memory.shape_from_config(args.model) if getattr(args, "model", None)
             else memory.LLAMA_SHAPES[args.preset] if args.preset else None)
    if getattr(args, "shards", None) is not None:
        if shape is None:
            raise ValueError("--shards needs --preset or --model: the gathered block depends "
                             "on the model's shapes")
        shards = args.shards or [1, 2, 4, 8]
        if any(n < 1 for n in shards):
            raise ValueError(f"--shards: GPU counts must be at least 1, got {shards}")
        print(memory.fsdp_memory_table(shape, shards, r=args.r, seq_len=args.seq_len,
                                       batch_size=args.batch_size,
                                       gradient_checkpointing=args.gradient_checkpointing))
        return 0
    if args.n_params is None and shape is None:
        raise ValueError("give the parameter count N (e.g. 65e9) or a --preset")
    if args.seq_len is not None and shape is None:
        raise ValueError("--seq-len needs --preset: activations depend on the model's shapes "
                         "(hidden size, layers, vocabulary)")
    n_params = args.n_params if args.n_params is not None else shape.n_params
    lora = args.lora_params
    if lora is None and shape is not None:
        lora = shape.lora_params(args.r)
    table = memory.memory_table(n_params, lora_params=lora, shape=shape, seq_len=args.seq_len,
                                batch_size=args.batch_size,
                                gradient_checkpointing=args.gradient_checkpointing)
    print(table)
    return 0
