"""The ``qlora-ref`` command line (also ``python -m qlora_ref``).

Subcommands (``qlora-ref COMMAND --help`` explains each):

* ``finetune`` -- the main job: QLoRA fine-tuning of the shipped tiny GPT;
* ``compare``  -- the paper's claims in miniature, over seeds;
* ``pretrain`` -- rebuild the base model the package ships;
* ``quantize FILE`` -- quantize a ``.npy`` / ``.safetensors`` tensor and report the error;
* ``memory N`` -- the fine-tuning memory table for an N-parameter model;
* ``bench``    -- speed of the NumPy, Cython and bitsandbytes paths;
* ``info``     -- the NF4 table and a 4096x4096 quantization summary (the default).

Errors (CUDA asked for but absent, an unknown task, an unreadable file)
print one line, ``qlora-ref: error: ...``, and exit with status 2.

OpenMP: importing this module imports ``qlora_ref`` first, which sets
``OMP_WAIT_POLICY=passive`` (unless the user chose) before torch or the
kernels load (:mod:`qlora_ref._runtime`); nothing here imports torch at the
top, so ``qlora-ref --help`` stays fast.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from .dtypes import FLOAT_DTYPES

__all__ = ["main", "build_parser"]


# ----------------------------------------------------------------------------- info

def _info(args) -> int:
    from . import active_backend, cython_available, dequantize_4bit, nf4_code, quantize_4bit
    from .codebooks import normal_float_code

    print("NF4 codebook (paper section 3; equal to bitsandbytes' table):")
    exact = normal_float_code(4, float32_steps=False)
    for i, (v, v64) in enumerate(zip(nf4_code(), exact)):
        print(f"  {i:2d}  0b{i:04b}  {v: .8f}   (float64 derivation {v64: .8f})")
    rng = np.random.default_rng(args.seed)
    n = args.size
    w = rng.standard_normal((n, n), dtype=np.float32) * np.float32(0.02)
    backend = active_backend()
    status = ("built and in use" if backend == "cython"
              else "built, not in use" if cython_available() else "NOT built")
    print(f"\nQuantizing a random {n}x{n} float32 matrix (N(0, 0.02^2), seed {args.seed}) "
          f"with NF4, blocksize 64; backend: {backend} (Cython extension {status})")
    print(f"  {'double quant':<14}{'bits/param':>12}{'MSE':>14}{'max |error|':>14}"
          f"{'quantize s':>12}{'dequantize s':>14}")
    for dq in (False, True):
        t0 = time.perf_counter()
        state = quantize_4bit(w, "nf4", 64, double_quant=dq)
        t1 = time.perf_counter()
        w_hat = dequantize_4bit(state)
        t2 = time.perf_counter()
        err = w_hat - w
        print(f"  {str(dq):<14}{state.bits_per_param:>12.4f}{float(np.mean(err ** 2)):>14.4e}"
              f"{float(np.abs(err).max()):>14.4e}{t1 - t0:>12.3f}{t2 - t1:>14.3f}")
    print("\nDouble quantization: 32/64 = 0.5 bits of constants per parameter become "
          "8/64 + 32/(64*256) = 0.127 (paper: 0.373 bits saved).")
    return 0


# ----------------------------------------------------------------------------- finetune

def _finetune_config(args):
    from .train.finetune import FinetuneConfig, load_config

    overrides = dict(task=args.task, quant_bits=args.quant_bits,
                     bnb_4bit_quant_type=args.quant_type, r=args.r, lora_alpha=args.lora_alpha,
                     learning_rate=args.learning_rate, num_train_epochs=args.epochs,
                     max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                     gradient_accumulation_steps=args.gradient_accumulation_steps,
                     save_steps=args.save_steps, base_model=args.base_model, seed=args.seed,
                     optim=args.optim)
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
    return FinetuneConfig(**{k: v for k, v in overrides.items() if v is not None})


def _finetune(args) -> int:
    from .train.finetune import finetune
    from .train.report import format_report

    config = _finetune_config(args)
    out = args.output_dir
    if not args.quiet:
        print(f"qlora-ref finetune: {config.method()} on task '{config.task}', "
              f"{config.total_steps()} steps, output in {out}", flush=True)
    result = finetune(config, device=args.device, output_dir=out, resume_from=args.resume,
                      stop_after=args.stop_after, progress=not args.quiet)
    if not args.quiet and result.after:
        print(format_report(result).split("Configuration:")[0])
        print(f"adapters (PEFT layout): {os.path.join(out, 'adapter')}\n"
              f"loss curve: {os.path.join(out, 'loss_curve.png')}\n"
              f"report: {os.path.join(out, 'report.md')}")
    return 0


def _compare(args) -> int:
    from .train.compare import format_table, run_compare
    from .train.finetune import FinetuneConfig

    profile = "quick" if args.quick else args.profile
    base = FinetuneConfig(base_model=args.base_model or "default")
    seeds = args.seeds if args.seeds else None
    started = time.perf_counter()
    results = run_compare(profile, device=args.device, seeds=seeds, base_config=base,
                          output_dir=args.output_dir, progress=not args.quiet)
    print(format_table(results))
    print(f"\n{time.perf_counter() - started:.0f} s; table, JSON and plot in {args.output_dir}")
    return 0


def _pretrain(args) -> int:
    from .train.pretrain import run  # also python -m qlora_ref.train.pretrain

    return run(args)


# ----------------------------------------------------------------------------- quantize

def _load_tensor(path: str, key: str | None) -> tuple[np.ndarray, str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    if path.endswith(".npy"):
        from numpy.lib import format as npy

        try:  # the header first: np.load allocates whatever shape it claims
            with open(path, "rb") as f:
                version = npy.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"unsupported .npy format version {version}")
                shape, _, dtype = (npy.read_array_header_1_0(f) if version == (1, 0)
                                   else npy.read_array_header_2_0(f))
                held = os.path.getsize(path) - f.tell()
            claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if claimed != held:
                raise ValueError(f"its header claims shape {shape} of {dtype} ({claimed:,} bytes), "
                                 f"but it holds {held:,} bytes of data")
            return np.load(path, allow_pickle=False), os.path.basename(path)
        except (ValueError, OSError, EOFError, SyntaxError) as exc:
            raise ValueError(f"{path} is not a readable .npy file: {exc}") from None
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path} is not a readable .safetensors file: {exc}") from None
        if key is None:
            if len(tensors) != 1:
                raise ValueError(f"{path} holds {len(tensors)} tensors; pick one with --key "
                                 f"({', '.join(sorted(tensors)[:10])}{'...' if len(tensors) > 10 else ''})")
            key = next(iter(tensors))
        if key not in tensors:
            raise ValueError(f"{path} has no tensor {key!r}")
        t = tensors[key]
        dtype = str(t.dtype).replace("torch.", "")
        if dtype not in FLOAT_DTYPES:  # as quantize_4bit takes
            raise ValueError(f"{path}: tensor {key!r} is {dtype}; quantize takes float16, "
                             "bfloat16, float32 or float64")
        return (t.float().numpy() if dtype == "bfloat16" else t.numpy()), key
    raise ValueError(f"{path}: expected a .npy or .safetensors file")


def _quantize(args) -> int:
    from . import dequantize_4bit, quantize_4bit

    x, name = _load_tensor(args.file, args.key)
    state = quantize_4bit(x, args.quant_type, args.blocksize, double_quant=not args.no_double_quant)
    x64 = np.asarray(x, dtype=np.float64)
    err = dequantize_4bit(state, dtype="float64") - x64
    rel = np.linalg.norm(err) / max(np.linalg.norm(x64), 1e-300)
    print(f"{name}: shape {state.shape}, dtype {state.dtype}, {args.quant_type}, blocksize "
          f"{args.blocksize}, double quantization {'off' if args.no_double_quant else 'on'}")
    print(f"  bits per parameter      {state.bits_per_param:.4f}  ({state.nbytes:,} bytes vs "
          f"{2 * state.n_elements:,} in 16-bit)")
    print(f"  mean squared error      {float(np.mean(err ** 2)):.6e}")
    print(f"  max |error|             {float(np.abs(err).max()):.6e}")
    print(f"  relative Frobenius err  {rel:.6e}")
    if args.histogram:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 3.6), dpi=110)
        ax = fig.subplots()
        ax.hist(err.reshape(-1), bins=200, color="#4C72B0")
        ax.set_xlabel("dequantized - original")
        ax.set_ylabel("count")
        ax.set_title(f"{name}: {args.quant_type} quantization error")
        fig.tight_layout()
        fig.savefig(args.histogram)
        print(f"  histogram written to {args.histogram}")
    return 0


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


def _memory(args) -> int:
    from . import memory

    lora = args.lora_params
    if args.preset == "llama-65b":
        lora = memory.lora_param_count(**memory.LLAMA_65B, r=args.r)
    table = memory.memory_table(args.n_params, lora_params=lora)
    print(table)
    return 0


def _bench(args) -> int:
    from . import bench

    return int(bench.main(args) or 0)


# ----------------------------------------------------------------------------- parser

class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (``qlora-ref finetune: error: ...``) and status 2.

    ``--help`` still prints the full usage; the sub-command parsers are of this class too.
    """

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="where to run (default: cuda if available, else cpu)")
    common.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    common.add_argument("--quiet", action="store_true", help="print only the results")

    parser = _Parser(
        prog="qlora-ref", description="QLoRA, readable and exact: NF4 storage, LoRA on a "
        "4-bit base, and a tiny GPT to fine-tune. Run a COMMAND with --help for its options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", parents=[common], help="NF4 table and a 4096x4096 quantization "
                       "summary (the default command)")
    p.add_argument("--size", type=int, default=4096, help="matrix side (default 4096)")
    p.set_defaults(func=_info)

    p = sub.add_parser("finetune", parents=[common], help="the main job: QLoRA-fine-tune the "
                       "shipped tiny GPT, evaluate before/after, save adapters, plot, report",
                       description="Quantize the base model to NF4 with double quantization, "
                       "attach LoRA to every linear layer, fine-tune on a generated task, and "
                       "write adapters (PEFT layout), loss_curve.png and report.md.")
    p.add_argument("--config", nargs=2, metavar=("FILE", "NAME"),
                   help="read the named configuration from a JSON file (see "
                        "qlora_ref/configs/finetune_configs.json); flags below override it")
    p.add_argument("--task", help="fine-tuning task (default: sort); see qlora_ref.train.tasks")
    p.add_argument("--quant-bits", type=int, choices=[4, 8, 16], help="base storage: 4 (QLoRA, "
                   "default), 8 (blockwise 8-bit) or 16 (plain LoRA)")
    p.add_argument("--quant-type", choices=["nf4", "fp4", "int4"], help="4-bit type (default nf4)")
    p.add_argument("--no-double-quant", action="store_true", help="keep float32 absmax constants")
    p.add_argument("--full-finetune", action="store_true", help="train all weights, no adapters")
    p.add_argument("--r", type=int, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 16; scaling alpha/r)")
    p.add_argument("--target-modules", nargs="+", help="'all-linear' (default) or layer names, "
                   "e.g. q_proj k_proj v_proj o_proj")
    p.add_argument("--learning-rate", "--lr", type=float, help="AdamW learning rate")
    p.add_argument("--epochs", type=float, help="passes over the training set")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, help="examples per micro-batch (per process)")
    p.add_argument("--gradient-accumulation-steps", type=int, help="micro-batches per step")
    p.add_argument("--optim", choices=["paged_adamw", "adamw", "bnb_paged_adamw"],
                   help="optimizer (default paged_adamw, qlora_ref's educational pager)")
    p.add_argument("--base-model", help="a base model .safetensors (default: the shipped one)")
    p.add_argument("--output-dir", default="runs/finetune", help="where results go "
                   "(default runs/finetune)")
    p.add_argument("--save-steps", type=int, help="checkpoint every N steps")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue from a verified checkpoint: "
                   "OUTPUT_DIR, OUTPUT_DIR/checkpoint (its newest complete one) or a step-N folder; "
                   "made with the same settings (only the number of steps may change)")
    p.add_argument("--stop-after", type=int, metavar="N", help="stop after N steps, as if "
                   "interrupted (then --resume)")
    p.set_defaults(func=_finetune)

    p = sub.add_parser("compare", parents=[common], help="full FT vs LoRA vs QLoRA NF4/FP4/Int4, "
                       "all-linear vs attention-only, rank sweep; over seeds")
    p.add_argument("--quick", action="store_true", help="the short profile (under 2 minutes)")
    p.add_argument("--profile", choices=["quick", "full"], default="full")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    p.add_argument("--base-model", help="a base model .safetensors (default: the shipped one)")
    p.add_argument("--output-dir", default="runs/compare", help="default runs/compare")
    p.set_defaults(func=_compare)

    p = sub.add_parser("pretrain", parents=[common], help="pretrain the tiny base GPT (the "
                       "shipped model is this command's output with the defaults)")
    # the defaults are the settings that made the shipped file (qlora_ref/assets/README.md)
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    p.add_argument("--batch-size", type=int, default=64, help="examples per step (default 64)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default 2e-3)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2; the "
                   "result depends on it)")
    p.add_argument("--isa", choices=["avx2", "native"], default="avx2", help="CPU kernels of "
                   "torch and oneDNN (default avx2, which made the shipped file; the result "
                   "depends on it)")
    p.add_argument("--output", help="output .safetensors (default runs/pretrain/base_model"
                   ".safetensors; a path inside the package is refused)")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("quantize", parents=[common], help="quantize a .npy/.safetensors tensor: "
                       "error and bits per parameter")
    p.add_argument("file", help="a .npy file, or a .safetensors file (with --key)")
    p.add_argument("--key", help="tensor name inside a .safetensors file")
    p.add_argument("--quant-type", choices=["nf4", "fp4", "int4"], default="nf4")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--no-double-quant", action="store_true")
    p.add_argument("--histogram", metavar="PNG", help="write a histogram of the error")
    p.set_defaults(func=_quantize)

    p = sub.add_parser("memory", parents=[common], help="fine-tuning memory: full 16-bit vs "
                       "LoRA vs QLoRA for an N-parameter model")
    p.add_argument("n_params", type=_parse_count, metavar="N", help="parameters, e.g. 65e9 or 7B")
    p.add_argument("--preset", choices=["llama-65b"], help="count LoRA parameters as the paper "
                   "does for LLaMA-65B (all 7 projections of 80 layers)")
    p.add_argument("--r", type=int, default=64, help="LoRA rank for --preset (default 64)")
    p.add_argument("--lora-params", type=_parse_count, help="LoRA parameters (default 0.2%% of N)")
    p.set_defaults(func=_memory)

    p = sub.add_parser("bench", help="quantize/dequantize/pack speed: NumPy, "
                       "Cython (1 and all threads), bitsandbytes, memory copy")
    try:
        from . import bench
        bench.add_arguments(p)
    except ImportError:  # pragma: no cover
        pass
    p.set_defaults(func=_bench)
    return parser


def apply_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on what was given: ``--seed`` is 0 unless given.

    ``args.seed_given`` records whether it was: an explicit ``--seed`` (0 too)
    overrides a config file's seed, the default does not.
    """
    args.seed_given = getattr(args, "seed", None) is not None
    if not args.seed_given:
        args.seed = 0
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["info", *argv]
    parser = build_parser()
    args = apply_defaults(parser.parse_args(argv))
    if getattr(args, "device", None) == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("qlora-ref: error: --device cuda was asked for, but no CUDA GPU is available "
                  "(torch.cuda.is_available() is False)", file=sys.stderr)
            return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        print(f"qlora-ref: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qlora-ref: interrupted", file=sys.stderr)
        return 130
