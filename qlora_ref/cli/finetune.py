"""``qlora-ref finetune``: the main job.

Two forms, the same flags where they apply:

* ``qlora-ref finetune [--task sort]`` -- the shipped tiny GPT on a generated
  task (:func:`qlora_ref.train.finetune.finetune`);
* ``qlora-ref finetune --model DIR --data FILE.jsonl`` -- any local Hugging
  Face causal LM on a JSONL file (:func:`qlora_ref.train.hf_finetune.hf_finetune`).

Both run the one loop of :mod:`qlora_ref.train.loop` (checkpoints with
``--save-steps``, ``--resume``, ``--stop-after``, ``--full-finetune``) and
write ``adapter/`` (PEFT layout; ``model/`` with ``--full-finetune``),
``checkpoint/``, ``loss_curve.png``, ``report.md`` and ``report.json`` into
``--output-dir``. Under ``torchrun --nproc-per-node N`` the processes share
every batch (DistributedDataParallel); with ``--fsdp`` the model is sharded
over them with FSDP2 instead (``docs/multi_gpu.md``). A named configuration (``--config FILE NAME``) with a
``dataset_path`` is of the second form.

Every input (configuration, data file, model folder, output folder, the
checkpoint to resume) is checked before the banner is printed or anything is
created. An ``--output-dir`` that holds an earlier run's results
(``adapter/``, ``model/``, ``report.json`` or ``checkpoint/``) is refused
unless ``--overwrite`` (start over: the earlier checkpoints are deleted, the
adapter and report replaced at the end) or ``--resume`` is given, as
``transformers``' example scripts refuse without ``--overwrite_output_dir``.
"""
from __future__ import annotations

import json
import os

from ..validation import OPTIMIZERS, QUANT_BITS, QUANT_TYPES

HELP = ("the main job: QLoRA-fine-tune the shipped tiny GPT, or a local Hugging Face model on "
        "a JSONL file (--model DIR --data FILE); evaluate before/after, save adapters, plot, report")
DESCRIPTION = ("Quantize the base model to NF4 with double quantization, attach LoRA to every "
               "linear layer, fine-tune, and write adapters (PEFT layout), loss_curve.png and "
               "report.md. Without --model: the shipped tiny GPT on a generated task. With "
               "--model DIR --data FILE.jsonl: a local Hugging Face causal LM on JSONL lines "
               '{"text"}, {"prompt","completion"} or {"instruction","input","output"}, the loss '
               "on the completions only.")

#: Flags of the tiny-GPT form only, and of the Hugging Face form only (refused in the other).
TINY_ONLY = {"task": "--task"}
HF_ONLY = {"max_length": "--max-length", "truncate": "--truncate"}


def add_arguments(p):
    p.add_argument("--config", nargs=2, metavar=("FILE", "NAME"),
                   help="read the named configuration from a JSON file (see "
                        "qlora_ref/configs/finetune_configs.json); flags below override it")
    p.add_argument("--model", metavar="DIR", help="a local Hugging Face causal LM folder "
                   "(config.json, weights, tokenizer); with --data")
    p.add_argument("--data", metavar="FILE.jsonl", help="training data, one JSON object a line: "
                   '{"text"}, {"prompt","completion"} or {"instruction","input","output"}')
    p.add_argument("--max-length", type=int, help="tokens per example with --model (default "
                   "512); a longer example is an error naming its line, unless --truncate")
    p.add_argument("--truncate", action="store_true", help="cut examples over --max-length "
                   "instead of refusing them")
    p.add_argument("--task", help="fine-tuning task of the tiny GPT (default: sort); see "
                   "qlora_ref.train.tasks")
    p.add_argument("--quant-bits", type=int, choices=QUANT_BITS, help="base storage: 4 (QLoRA, "
                   "default), 8 (blockwise 8-bit) or 16 (plain LoRA)")
    p.add_argument("--quant-type", choices=QUANT_TYPES, help="4-bit type (default nf4)")
    p.add_argument("--no-double-quant", action="store_true", help="keep float32 absmax constants")
    p.add_argument("--full-finetune", action="store_true", help="train every weight (float32), "
                   "no adapters; the trained model goes to OUTPUT_DIR/model")
    p.add_argument("--r", type=int, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 16; scaling alpha/r)")
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0 for the tiny "
                   "GPT, 0.05 with --model)")
    p.add_argument("--target-modules", nargs="+", help="'all-linear' (default) or layer names, "
                   "e.g. q_proj k_proj v_proj o_proj")
    p.add_argument("--learning-rate", "--lr", type=float, help="AdamW learning rate (default "
                   "3e-3 for the tiny GPT, 2e-4 with --model)")
    p.add_argument("--epochs", type=float, help="passes over the training set (default 3)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, help="examples per micro-batch (per process; "
                   "default 32 for the tiny GPT, 8 with --model)")
    p.add_argument("--gradient-accumulation-steps", type=int, help="micro-batches per step")
    p.add_argument("--optim", choices=OPTIMIZERS,
                   help="optimizer (default paged_adamw, qlora_ref's educational pager)")
    p.add_argument("--base-model", help="a tiny-GPT base model .safetensors (default: the "
                   "shipped one)")
    p.add_argument("--output-dir", default="runs/finetune", help="where results go "
                   "(default runs/finetune)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier "
                   "run in --output-dir (without it, or --resume, such a folder is refused)")
    p.add_argument("--save-steps", type=int, help="checkpoint every N steps")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue from a verified checkpoint: "
                   "OUTPUT_DIR, OUTPUT_DIR/checkpoint (its newest complete one) or a step-N folder; "
                   "made with the same settings (only the number of steps may change)")
    p.add_argument("--stop-after", type=int, metavar="N", help="stop after N steps, as if "
                   "interrupted (then --resume)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the 4-bit base and "
                   "the adapters over the processes with FSDP2 instead of replicating the model "
                   "(DDP); trains with --optim adamw, checkpoints with DCP; a checkpoint resumes "
                   "on another process count with the same global batch (see docs/multi_gpu.md)")
    return p


def _is_hf(args) -> bool:
    """Is this the Hugging Face form? (--model/--data given, or a named config with a dataset)."""
    if getattr(args, "model", None) or getattr(args, "data", None):
        return True
    if getattr(args, "config", None):
        try:
            with open(args.config[0]) as f:
                entry = json.load(f).get(args.config[1])
            return isinstance(entry, dict) and "dataset_path" in entry
        except (OSError, ValueError, AttributeError):
            return False  # load_config reports the problem
    return False


def _finetune_config(args):
    """The run's configuration from parsed arguments (a named config, then the flags over it)."""
    from ..train.config import FinetuneConfig, load_config

    hf = _is_hf(args)
    if hf and args.base_model:
        raise ValueError("--base-model is the tiny GPT's .safetensors; with a Hugging Face "
                         "model use --model DIR")
    for name, flag in (TINY_ONLY if hf else HF_ONLY).items():
        if getattr(args, name, None):
            other = "the tiny GPT (no --model)" if hf else "--model DIR --data FILE"
            raise ValueError(f"{flag} applies only to {other}")
    overrides = dict(task=getattr(args, "task", None), quant_bits=args.quant_bits,
                     bnb_4bit_quant_type=args.quant_type, r=args.r, lora_alpha=args.lora_alpha,
                     lora_dropout=getattr(args, "lora_dropout", None),
                     learning_rate=args.learning_rate, num_train_epochs=args.epochs,
                     max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                     gradient_accumulation_steps=args.gradient_accumulation_steps,
                     save_steps=args.save_steps, base_model=args.base_model, seed=args.seed,
                     optim=args.optim or ("adamw" if getattr(args, "fsdp", False) else None))
    if hf:
        overrides.update(base_model=getattr(args, "model", None),
                         dataset_path=getattr(args, "data", None),
                         max_length=getattr(args, "max_length", None),
                         truncate=True if getattr(args, "truncate", False) else None)
    if args.no_double_quant:
        overrides["bnb_4bit_use_double_quant"] = False
    if args.full_finetune:
        overrides["full_finetune"] = True
    if args.target_modules:
        overrides["target_modules"] = (args.target_modules[0] if args.target_modules == ["all-linear"]
                                       else args.target_modules)
    if args.config:
        # an explicit --seed (0 included) overrides the file's seed; main()'s default does not
        if not getattr(args, "seed_given", True):
            overrides["seed"] = None
        return load_config(args.config[0], args.config[1], **overrides)
    if hf:
        from ..train.config import HFFinetuneConfig

        if not overrides["base_model"] or not overrides["dataset_path"]:
            raise ValueError("--model DIR and --data FILE.jsonl go together")
        return HFFinetuneConfig(**{k: v for k, v in overrides.items() if v is not None})
    return FinetuneConfig(**{k: v for k, v in overrides.items() if v is not None})


def _banner(config, out) -> str:
    hf = bool(getattr(config, "dataset_path", ""))
    return (f"qlora-ref finetune: {config.method()} of "
            f"{config.base_model if hf else 'the tiny GPT'} on "
            f"{config.dataset_path if hf else repr(config.task)}, output in {out}")


def run(args) -> int:
    config = _finetune_config(args)
    out = args.output_dir
    first = os.environ.get("RANK", "0") == "0"  # under torchrun, one banner
    on_ready = None if args.quiet or not first else (lambda: print(_banner(config, out), flush=True))
    common = dict(device=args.device, output_dir=out, resume_from=args.resume,
                  stop_after=args.stop_after, progress=not args.quiet,
                  overwrite=args.overwrite, on_ready=on_ready, fsdp=args.fsdp)
    if getattr(config, "dataset_path", ""):
        from ..train.hf_finetune import hf_finetune

        result = hf_finetune(config, **common)
    else:
        from ..train.finetune import finetune

        result = finetune(config, **common)
    if not args.quiet and result.after:
        from ..train.report import format_summary

        print(format_summary(result))
        saved = (f"model: {os.path.join(out, 'model')}" if config.full_finetune
                 else f"adapters (PEFT layout): {os.path.join(out, 'adapter')}")
        print(f"{saved}\n"
              f"loss curve: {os.path.join(out, 'loss_curve.png')}\n"
              f"report: {os.path.join(out, 'report.md')}")
    return 0
