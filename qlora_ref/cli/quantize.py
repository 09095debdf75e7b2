"""``qlora-ref quantize FILE``: quantize a ``.npy`` / ``.safetensors`` tensor; report the error.

``qlora-ref quantize --model DIR --save OUT``: quantize a Hugging Face
causal LM's linear layers (all but the output head) once and save the 4-bit
model (:func:`qlora_ref.nn.saved4bit.save_quantized`): a folder that
``qlora-ref generate --model OUT`` loads without quantizing again, and that
transformers + bitsandbytes open with ``AutoModelForCausalLM.from_pretrained``.
An existing non-empty ``OUT`` is replaced only with ``--overwrite`` (and only
if it is itself a saved 4-bit model).

Files are read without running code: a ``.npy`` header is checked against
the file's size before ``np.load(allow_pickle=False)`` allocates anything,
and a ``.safetensors`` file goes through ``safetensors``. Only regular files
are read (a FIFO or ``/dev/zero`` is one error line, never a hang). The
``--histogram`` PNG is written atomically and never inside the package.
"""
from __future__ import annotations

import os

import numpy as np

from .._atomic import (atomic_path, check_regular_file, open_regular_file, refuse_inside_package,
                       regular_file_path)
from ..dtypes import FLOAT_DTYPES
from ..validation import QUANT_TYPES

HELP = ("quantize a .npy/.safetensors tensor (error, bits per parameter), or save a model in "
        "4 bits (--model DIR --save OUT)")
#: Shared flags it uses: --quiet (progress of --model); quantizing is deterministic, on the CPU.
COMMON = ("quiet",)


def add_arguments(parser):
    parser.add_argument("file", nargs="?", help="a .npy file, or a .safetensors file (with --key)")
    parser.add_argument("--model", metavar="DIR", help="instead of FILE: a local Hugging Face "
                        "causal LM folder, or 'smollm2', whose linear layers are quantized and "
                        "saved with --save")
    parser.add_argument("--save", metavar="OUT", help="with --model: the folder to write the "
                        "4-bit model to (generate --model OUT loads it without quantizing)")
    parser.add_argument("--overwrite", action="store_true", help="with --save: replace a saved "
                        "4-bit model already in OUT")
    parser.add_argument("--key", help="tensor name inside a .safetensors file")
    parser.add_argument("--quant-type", choices=QUANT_TYPES, default="nf4")
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--histogram", metavar="PNG", help="write a histogram of the error")
    return parser


def _load_tensor(path: str, key: str | None) -> tuple[np.ndarray, str]:
    if not os.path.lexists(path):
        raise FileNotFoundError(f"no such file: {path}")
    check_regular_file(path, "input")  # a FIFO or a device: one line, before any open
    if path.endswith(".npy"):
        from numpy.lib import format as npy

        try:  # the header first: np.load allocates whatever shape it claims
            with open_regular_file(path, "input") as f:
                version = npy.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"unsupported .npy format version {version}")
                shape, _, dtype = (npy.read_array_header_1_0(f) if version == (1, 0)
                                   else npy.read_array_header_2_0(f))
                held = os.fstat(f.fileno()).st_size - f.tell()
                claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if claimed != held:
                    raise ValueError(f"its header claims shape {shape} of {dtype} ({claimed:,} "
                                     f"bytes), but it holds {held:,} bytes of data")
                f.seek(0)  # the same open file: what was checked is what is read
                return np.load(f, allow_pickle=False), os.path.basename(path)
        except (ValueError, OSError, EOFError, SyntaxError) as exc:
            raise ValueError(f"{path} is not a readable .npy file: {exc}") from None
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            with regular_file_path(path, "input") as name:
                tensors = load_file(name)
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


def run(args) -> int:
    from .. import dequantize_4bit, quantize_4bit

    if args.model is not None or args.save is not None:
        return _save_model(args)
    if args.file is None:
        raise ValueError("quantize needs FILE (a tensor), or --model DIR --save OUT (a model)")

    if args.histogram:  # before the work: never inside the installed package
        refuse_inside_package(args.histogram, "--histogram")
        if os.path.isdir(args.histogram):
            raise ValueError(f"--histogram {args.histogram} is a directory; give a .png file path")
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
        with atomic_path(args.histogram) as tmp:  # a full disk leaves the old PNG whole
            fig.savefig(tmp, format="png")
        print(f"  histogram written to {args.histogram}")
    return 0


def _save_model(args) -> int:
    """``--model DIR --save OUT``: quantize the model's linear layers once and write the 4-bit folder."""
    if args.model is None or args.save is None:
        raise ValueError("saving a 4-bit model needs both --model DIR and --save OUT")
    if args.file is not None or args.key is not None or args.histogram is not None:
        raise ValueError("--model takes no FILE, --key or --histogram (those quantize one tensor)")
    if args.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"--quant-type {args.quant_type} is not a bitsandbytes type; a saved "
                         "4-bit model is nf4 or fp4 (transformers + bitsandbytes load it too)")
    from ..nn.saved4bit import check_save_folder, quantize_model, save_quantized
    from ..train.hf_finetune import load_pretrained
    from ..validation import check_blocksize

    check_blocksize(args.blocksize)
    check_save_folder(args.save, args.overwrite)  # before the model is read
    model, tokenizer = load_pretrained(args.model, device="cpu")
    model = quantize_model(model, quant_type=args.quant_type, blocksize=args.blocksize,
                           double_quant=not args.no_double_quant)
    save_quantized(model, args.save, tokenizer=tokenizer, overwrite=args.overwrite)
    size = os.path.getsize(os.path.join(args.save, "model.safetensors"))
    print(f"saved {args.model} in 4 bits ({args.quant_type}, blocksize {args.blocksize}, "
          f"double quantization {'off' if args.no_double_quant else 'on'}) to {args.save} "
          f"(model.safetensors {size:,} bytes)")
    return 0
