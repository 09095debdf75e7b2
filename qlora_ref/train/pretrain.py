"""Pretrain the tiny base GPT, and save/load it as safetensors.

QLoRA starts from a pretrained model (LLaMA in Dettmers et al. 2023, sec. 4).
Ours is a small :class:`~qlora_ref.train.gpt.GPT` trained from scratch on
the PRETRAIN tasks of :mod:`qlora_ref.train.tasks` (copy, reverse,
increment, on 3-8 digits) with AdamW, linear warm-up and cosine decay,
nanoGPT-style. One such model ships with the package (``qlora_ref/assets/base_model.safetensors``)
so fine-tuning never needs this step; see ``qlora_ref/assets/README.md`` for
the command that made it and its accuracies.

Everything is deterministic from ``seed`` and the number of torch CPU
threads: torch's initialisation uses ``torch.manual_seed(seed)``, batches
come from ``numpy.random.default_rng(seed)``, and the thread count changes
how float32 sums are split (1 and 2 threads differ in the last bit after a
few steps). The command fixes 2 threads, the setting that made the shipped
file.

One command, two spellings with the same flags and defaults:
``qlora-ref pretrain`` and ``python -m qlora_ref.train.pretrain`` (both
built from :func:`add_arguments`). With no flags it rebuilds the shipped model: seed 0,
3000 steps, batch 64, lr 2e-3, 2 threads, AVX2 kernels (``--isa avx2``:
torch's and oneDNN's AVX-512 kernels round differently), on the CPU.

The commands write to ``runs/pretrain/base_model.safetensors`` by default
and refuse any path inside the installed package: a run never replaces the
shipped model (copy a new one there by hand, on purpose).
"""

import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as save_bytes

from .._atomic import atomic_file, refuse_inside_package, regular_file_path
from ..validation import check_num_threads
from .gpt import GPT, GPTConfig
from .tasks import PRETRAIN_TASKS, DEFAULT_FINETUNE_TASK, VOCAB, evaluate, make_batch

__all__ = [
    "default_config", "pretrain", "save_base_model", "load_base_model",
    "default_base_model_path", "default_output_path", "check_output_path",
    "add_arguments", "build_parser", "run", "main", "DEFAULTS",
]

#: The settings that made the shipped file; :func:`pretrain`'s and the command's defaults.
DEFAULTS = dict(steps=3000, batch_size=64, lr=2e-3, seed=0, threads=2, isa="avx2")

_CONFIG_KEY = "gpt_config"  # safetensors metadata key holding GPTConfig as JSON


def default_config():
    """The size of the shipped base model (about 0.8 M parameters)."""
    return GPTConfig(vocab_size=len(VOCAB), block_size=32, n_layer=4, n_head=4, n_embd=128)


def _lr_at(step, steps, lr, warmup):
    """Linear warm-up to ``lr``, then cosine decay to ``lr / 10``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _check_arguments(steps, batch_size, lr, num_threads) -> None:
    """``ValueError`` naming the first bad argument of :func:`pretrain`."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if num_threads is not None:
        check_num_threads(num_threads)  # at most MAX_THREADS: libgomp aborts past what it can create


def pretrain(config=None, steps=3000, batch_size=64, lr=2e-3, seed=0, device="cpu",
             progress=True, task="pretrain", weight_decay=0.01, warmup=100, num_threads=None):
    """Train a GPT from scratch on a task (by default the PRETRAIN mixture).

    Parameters
    ----------
    config : GPTConfig, optional
        Model size; default :func:`default_config`.
    steps : int, default 3000
        Optimizer steps.
    batch_size : int, default 64
        Examples per step.
    lr : float, default 2e-3
        Peak AdamW learning rate (warm-up, then cosine decay to ``lr / 10``).
    seed : int, default 0
        Seeds torch (initialisation) and numpy (batches).
    device : str or torch.device, default "cpu"
    progress : bool, default True
        Print the loss every few hundred steps and accuracies at the end.
    task : str, default "pretrain"
        Training task name from ``TASKS``.
    weight_decay : float, default 0.01
    warmup : int, default 100
        Warm-up steps.
    num_threads : int, optional
        torch CPU threads for the run (restored afterwards); default: leave
        them as they are. The result depends on it: the shipped model was
        made with 2 (``qlora-ref pretrain`` passes ``--threads 2``).

    Returns
    -------
    GPT
        The trained model, in eval mode, on ``device``.
    """
    _check_arguments(steps, batch_size, lr, num_threads)
    config = config or default_config()
    if num_threads is None:
        return _train(config, steps, batch_size, lr, seed, device, progress, task, weight_decay, warmup)
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return _train(config, steps, batch_size, lr, seed, device, progress, task, weight_decay, warmup)
    finally:
        torch.set_num_threads(before)


def _train(config, steps, batch_size, lr, seed, device, progress, task, weight_decay, warmup):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = GPT(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        x, y, m = (t.to(device) for t in make_batch(task, batch_size, rng, config.block_size))
        _, loss = model(x, y, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress and (step % 250 == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - t0:6.1f}s")
    model.eval()
    if progress:
        for name in (*PRETRAIN_TASKS, DEFAULT_FINETUNE_TASK):
            r = evaluate(model, name)
            print(f"{name:>10s}: accuracy {r['accuracy']:.3f}  loss {r['loss']:.4f}")
    return model


def default_base_model_path():
    """Path of the base model shipped as package data.

    Returns
    -------
    pathlib.Path
        ``qlora_ref/assets/base_model.safetensors``.
    """
    return Path(__file__).resolve().parent.parent / "assets" / "base_model.safetensors"


def default_output_path():
    """Where ``qlora-ref pretrain`` writes by default: ``runs/pretrain/base_model.safetensors``."""
    return Path("runs") / "pretrain" / "base_model.safetensors"


def check_output_path(path):
    """Refuse, before training, an output path the model cannot or must not be written to.

    Raises ``ValueError`` (one line) for a path inside the installed package
    (the shipped model is never overwritten by a run), a folder, or a parent
    that is a file or not writable. Creates nothing.
    """
    path = Path(path)
    refuse_inside_package(path, "--output")
    resolved = path.resolve()
    if path.is_dir():
        raise ValueError(f"output {path} is a directory; give a .safetensors file path")
    existing = resolved.parent  # the nearest folder that exists: it must be one, and writable
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: {existing} is not writable")


def save_base_model(model, path):
    """Write a GPT's weights and config to a safetensors file.

    Parameters
    ----------
    model : GPT
        A plain (not LoRA-wrapped) model.
    path : str or pathlib.Path
        Output file; its folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {_CONFIG_KEY: json.dumps(asdict(model.config)), "format": "pt"}
    # the bytes are built in memory and written by Python: a full disk is then an OSError
    # (ENOSPC, one line in the CLI), not a SafetensorError from inside the Rust writer
    data = save_bytes(tensors, metadata=metadata)
    with atomic_file(path) as f:  # a kill or a full disk leaves the old file whole
        f.write(data)


def one_line(exc: BaseException) -> str:
    """An exception's message as one line: ``load_state_dict`` lists every key on its own line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    return f"{lines[0]} {lines[1]}"[:300] + f" (and {len(lines) - 2} more lines)" * (len(lines) > 2)


def load_base_model(path=None, device="cpu"):
    """Read a GPT written by :func:`save_base_model`.

    Parameters
    ----------
    path : str or pathlib.Path, optional
        File to read; default :func:`default_base_model_path`.
    device : str or torch.device, default "cpu"

    Returns
    -------
    GPT
        In eval mode, weights bit-identical to the file.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If ``path`` is not a readable safetensors file with a GPT config and
        matching weights.
    """
    path = Path(path) if path is not None else default_base_model_path()
    if not path.is_file():
        raise FileNotFoundError(f"no base model file at {path}")
    try:
        with regular_file_path(path, "base model") as name:  # one open: a FIFO never blocks
            with safe_open(name, framework="pt") as f:
                metadata = f.metadata() or {}
            config = GPTConfig(**json.loads(metadata[_CONFIG_KEY]))
            if config.vocab_size < len(VOCAB):  # token ids past the table were an IndexError later
                raise ValueError(f"its vocab_size {config.vocab_size} is smaller than the "
                                 f"tokenizer's {len(VOCAB)} characters")
            state = load_file(name)
        model = GPT(config)
        model.load_state_dict(state, strict=True)
    except (SafetensorError, OSError, KeyError, TypeError, RuntimeError, ValueError,
            RecursionError) as e:
        raise ValueError(f"{path} is not a valid qlora_ref base model: {one_line(e)}") from None
    return model.to(device).eval()


def build_parser():
    """The parser of ``python -m qlora_ref.train.pretrain``: :func:`add_arguments` plus the
    flags every ``qlora-ref`` command shares (``--seed``, default 0; ``--device``; ``--quiet``).

    ``qlora-ref pretrain`` adds the same :func:`add_arguments` to its subcommand, so the two
    spellings have one set of flags and defaults (``tests/train/test_pretrain.py`` compares them).
    The CLI is a floor above this module, so it is not imported here.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m qlora_ref.train.pretrain",
        description="Pretrain the tiny base GPT (the shipped model is this command's output "
                    "with the defaults).")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="where to run (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="print only the results")
    return add_arguments(parser)


def main(argv=None):
    """``python -m qlora_ref.train.pretrain [ARGS]``: the same command as ``qlora-ref pretrain [ARGS]``.

    With no flags: ``--steps 3000 --batch-size 64 --lr 2e-3 --seed 0 --threads 2 --isa avx2
    --device cpu --output runs/pretrain/base_model.safetensors``. A bad argument or output path
    prints one line and returns 2.
    """
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"python -m qlora_ref.train.pretrain: error: {exc}", file=sys.stderr)
        return 2


#: Environment read once per process, at the first CPU op, by ATen (its vectorised kernels)
#: and oneDNN; AVX-512 and AVX2 kernels round differently. The shipped file was made with AVX2.
_AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def add_arguments(parser):
    """Add the ``pretrain`` command's own flags to an argparse parser.

    The defaults are :data:`DEFAULTS`, the settings that made the shipped
    file (``qlora_ref/assets/README.md``). ``--seed``, ``--device`` and
    ``--quiet`` are the CLI's common flags (``--seed`` defaults to 0 there).
    """
    d = DEFAULTS
    parser.add_argument("--steps", type=int, default=d["steps"],
                        help=f"optimizer steps (default {d['steps']})")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"],
                        help=f"examples per step (default {d['batch_size']})")
    parser.add_argument("--lr", type=float, default=d["lr"],
                        help=f"peak AdamW learning rate (default {d['lr']:g})")
    parser.add_argument("--threads", type=int, default=d["threads"],
                        help=f"torch CPU threads (default {d['threads']}; the result depends on it)")
    parser.add_argument("--isa", choices=["avx2", "native"], default=d["isa"],
                        help="CPU kernels of torch and oneDNN (default avx2, which made the "
                             "shipped file; the result depends on it)")
    parser.add_argument("--output", help="output .safetensors (default runs/pretrain/base_model"
                        ".safetensors; a path inside the package is refused)")
    return parser


def run(args):
    """Run the ``pretrain`` command from parsed arguments; return the exit status (0)."""
    path = args.output or default_output_path()
    check_output_path(path)  # before training; never inside the installed package
    _check_arguments(args.steps, args.batch_size, args.lr, args.threads)  # before any warning
    saved = {k: os.environ.get(k) for k in _AVX2_ENV}
    if getattr(args, "isa", "native") == "avx2":
        for k, v in _AVX2_ENV.items():
            os.environ.setdefault(k, v)
        capability = torch.backends.cpu.get_cpu_capability()
        if capability != "AVX2":
            print(f"warning: torch's CPU kernels are {capability}, not AVX2 (torch ran an op in "
                  "this process before, or the CPU lacks AVX2): the result will not be "
                  "bit-identical to the shipped file", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        model = pretrain(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         device=args.device or "cpu", progress=not args.quiet,
                         num_threads=args.threads)
    finally:  # the process's environment as it was (child processes of a caller inherit it)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not args.quiet:
        print(f"total {time.perf_counter() - t0:.1f}s")
    save_base_model(model, path)
    print(f"saved the base model to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
