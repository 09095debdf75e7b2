r"""The 4-bit data types on the shipped base model, without fine-tuning.

The miniature of the QLoRA paper's data-type comparison (Dettmers et al.
2023, Section 4, Table 2 and Figure 3): quantize every projection of a
pretrained model with Int4, FP4 or NF4 (blocksize 64), with and without
double quantization, and measure how much the held-out loss rises. The
16-bit rows are the reference: the float32 weights as shipped, and the same
weights rounded to bfloat16 (the paper's 16-bit baseline).

A quantized layer is :class:`~qlora_ref.nn.Linear4bit` built by
:func:`qlora_ref.prepare_model` with adapters whose :math:`\mathbf B = 0`,
so the model computes exactly

.. math::
    \mathbf Y = \mathbf X\,\operatorname{dequant}(\mathbf W^{\text{4bit}})^\top ,

the base that QLoRA fine-tunes. As in the paper (and bitsandbytes' model
loading), the output head ``lm_head`` stays in 16 bit; the embeddings are not
linear layers.

The held-out data are the fixed evaluation sets of the pretraining tasks
(:func:`qlora_ref.train.tasks.held_out`, seed ``EVAL_SEED``), which
pretraining never saw. The loss is the mean cross-entropy per answer token
(EOS included) under teacher forcing, over the three tasks together;

.. math::
    \text{perplexity} = \exp(\text{loss}) .

Accuracy is exact match of greedy answers, as everywhere in
:mod:`qlora_ref.train`.

The same table on a real pretrained model (:func:`real_datatype_table`,
``qlora-ref datatypes --model smollm2``): every projection weight of a
Hugging Face causal LM replaced by :math:`\operatorname{dequant}(\operatorname{quant}(\mathbf W))`
(the embedding and the tied output head stay float32), scored by perplexity
on the pinned licence texts (:mod:`qlora_ref.train.real_text`,
:mod:`qlora_ref.train.perplexity`), once through this package and once
through bitsandbytes' own ``quantize_4bit`` / ``dequantize_4bit``. Rows whose
weights are bit-identical to an earlier row's share its perplexity (the
forward pass is a function of the weights; the SHA-256 of all projection
weights decides), so the equality of bytes is measured, not assumed.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from .._atomic import atomic_path
from ..nn import prepare_model
from ..validation import QUANT_TYPES
from . import tasks
from .pretrain import load_base_model

__all__ = ["ROWS", "quantize_model", "datatype_table", "format_datatype_table",
           "plot_datatype_table", "REAL_ROWS", "dequantized_copy", "real_datatype_table",
           "format_real_table", "plot_real_table", "add_arguments", "run"]

#: (row name, quant_type or a 16-bit dtype name, double quantization)
ROWS = (
    ("float32 (as shipped)", "float32", False),
    ("bfloat16", "bfloat16", False),
    ("Int4", "int4", False),
    ("Int4 + DQ", "int4", True),
    ("FP4", "fp4", False),
    ("FP4 + DQ", "fp4", True),
    ("NF4", "nf4", False),
    ("NF4 + DQ", "nf4", True),
)


def quantize_model(model, kind: str, double_quant: bool = False):
    """A copy of ``model`` whose projections are stored as ``kind``; ``model`` is left alone.

    ``kind`` is ``"nf4"``, ``"fp4"`` or ``"int4"`` (blocksize 64, the paper's),
    ``"bfloat16"`` (weights rounded to bfloat16, computed in float32) or
    ``"float32"`` (an unchanged copy).
    """
    model = copy.deepcopy(model)
    if kind == "float32":
        return model.eval()
    if kind == "bfloat16":
        with torch.no_grad():
            for name in _projections(model):
                w = model.get_submodule(name).weight
                w.copy_(w.to(torch.bfloat16).to(w.dtype))  # round to nearest even, 8-bit mantissa
        return model.eval()
    if kind not in QUANT_TYPES:
        raise ValueError(f"kind must be 'float32', 'bfloat16', 'nf4', 'fp4' or 'int4', got {kind!r}")
    # B = 0 at initialisation ("lora" init): the layer is exactly its quantized base
    return prepare_model(model, quant_type=kind, double_quant=double_quant, blocksize=64).eval()


def _projections(model) -> list:
    from ..nn.model import find_target_modules
    return find_target_modules(model, "all-linear")  # every nn.Linear but the output head


def datatype_table(base_model=None, n: int = 200, task_names=tasks.PRETRAIN_TASKS,
                   accuracy: bool = True, rows=ROWS) -> list[dict]:
    """One row per data type: held-out loss, perplexity and accuracy of the quantized base.

    Parameters
    ----------
    base_model : path or GPT, optional
        Default: the shipped ``qlora_ref/assets/base_model.safetensors``.
    n : int, default 200
        Held-out examples per task (at most ``tasks.EVAL_SIZE``).
    task_names : sequence of str, default the pretraining tasks
    accuracy : bool, default True
        Also score greedy answers (most of the time of a row).
    rows : sequence of (name, kind, double_quant), default ``ROWS``

    Returns
    -------
    list of dict
        ``{"name", "kind", "double_quant", "loss", "perplexity", "accuracy",
        "tasks": {task: {"loss", "accuracy"}}}``; ``loss`` is per answer token
        over all tasks together, ``accuracy`` the mean over tasks (None
        without ``accuracy``).
    """
    if base_model is None or isinstance(base_model, (str, os.PathLike)):
        base_model = load_base_model(base_model)
    held = {t: tasks.held_out(t, n) for t in task_names}
    table = []
    for name, kind, dq in rows:
        model = quantize_model(base_model, kind, dq)
        per_task, loss_sum, n_tokens = {}, 0.0, 0
        for t, pairs in held.items():
            loss, tokens = _answer_loss(model, pairs)
            loss_sum, n_tokens = loss_sum + loss * tokens, n_tokens + tokens
            acc = tasks.evaluate_pairs(model, pairs)["accuracy"] if accuracy else None
            per_task[t] = {"loss": loss, "accuracy": acc}
        loss = loss_sum / n_tokens
        table.append({"name": name, "kind": kind, "double_quant": dq, "loss": loss,
                      "perplexity": math.exp(loss),  # exp of the mean answer-token loss
                      "accuracy": (sum(v["accuracy"] for v in per_task.values()) / len(per_task)
                                   if accuracy else None),
                      "tasks": per_task})
    return table


@torch.no_grad()
def _answer_loss(model, pairs) -> tuple[float, int]:
    """(mean cross-entropy per answer token, number of answer tokens) under teacher forcing."""
    x, y, mask = tasks.encode_pairs(pairs, model.config.block_size)  # (B, T) each
    _, loss = model(x, y, mask)
    return loss.item(), int(mask.sum())


def format_datatype_table(table: list[dict]) -> str:
    """Markdown: one row per data type, the loss also as a ratio to the float32 row."""
    ref = next((r["loss"] for r in table if r["kind"] == "float32"), None)
    lines = ["| data type | answer-token loss | x float32 | perplexity | exact match |",
             "|---|---:|---:|---:|---:|"]
    for r in table:
        ratio = f"{r['loss'] / ref:.2f}" if ref else "-"
        acc = f"{r['accuracy']:.3f}" if r["accuracy"] is not None else "-"
        lines.append(f"| {r['name']} | {r['loss']:.3g} | {ratio} | {r['perplexity']:.5f} | {acc} |")
    return "\n".join(lines)


def plot_datatype_table(table: list[dict], path) -> Path:
    """Bar chart of each row's loss increase over the float32 row, written atomically to ``path``.

    Bars: over all tasks together; dots: per task. Linear axis from zero, so
    bar lengths compare honestly.
    """
    from matplotlib.figure import Figure  # not pyplot: leaves the caller's backend alone

    path = Path(path)
    ref = next(r for r in table if r["kind"] == "float32")

    def rise(loss, ref_loss):
        return 100.0 * (loss / ref_loss - 1.0)  # percent above the float32 loss

    fig = Figure(figsize=(7.5, 3.8), dpi=110)
    ax = fig.subplots()
    colours = {"float32": "#777777", "bfloat16": "#999999", "int4": "#C44E52", "fp4": "#DD8452",
               "nf4": "#4C72B0"}
    for i, r in enumerate(table):
        ax.barh(i, rise(r["loss"], ref["loss"]), color=colours[r["kind"]],
                hatch="//" if r["double_quant"] else None, edgecolor="white")
        for j, (t, v) in enumerate(r["tasks"].items()):
            ax.plot(rise(v["loss"], ref["tasks"][t]["loss"]), i, linestyle="none",
                    marker="os^D"[j % 4], color="black", markersize=3.5, label=t if i == 0 else None)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(table)), [r["name"] for r in table])
    ax.invert_yaxis()
    ax.set_xlabel("held-out answer-token loss above float32, % (no fine-tuning; hatched: DQ)")
    ax.legend(title="per task", fontsize=7, title_fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    return path


#: (row name, kind, double_quant, implementation) of the real-model table
REAL_ROWS = (
    ("float32 (as converted)", "float32", False, "torch"),
    ("bfloat16", "bfloat16", False, "torch"),
    ("Int4", "int4", False, "qlora_ref"),
    ("Int4 + DQ", "int4", True, "qlora_ref"),
    ("FP4", "fp4", False, "qlora_ref"),
    ("FP4 + DQ", "fp4", True, "qlora_ref"),
    ("NF4", "nf4", False, "qlora_ref"),
    ("NF4 + DQ", "nf4", True, "qlora_ref"),
    ("FP4 (bitsandbytes)", "fp4", False, "bitsandbytes"),
    ("FP4 + DQ (bitsandbytes)", "fp4", True, "bitsandbytes"),
    ("NF4 (bitsandbytes)", "nf4", False, "bitsandbytes"),
    ("NF4 + DQ (bitsandbytes)", "nf4", True, "bitsandbytes"),
)


def _roundtrip(w: torch.Tensor, kind: str, double_quant: bool, blocksize: int,
               impl: str) -> torch.Tensor:
    """``dequant(quant(w))`` in float32, by this package or by bitsandbytes (its bytes, its code)."""
    if impl == "qlora_ref":
        from .. import dequantize_4bit, quantize_4bit

        state = quantize_4bit(w, quant_type=kind, blocksize=blocksize, double_quant=double_quant)
        return torch.from_numpy(dequantize_4bit(state, dtype="float32"))
    import bitsandbytes.functional as bnb_F

    packed, qs = bnb_F.quantize_4bit(w, blocksize=blocksize, quant_type=kind,
                                     compress_statistics=double_quant)
    if w.shape[-1] % blocksize == 0:
        return bnb_F.dequantize_4bit(packed, qs)
    # bitsandbytes' AVX-512 CPU dequantize misreads rows that are not whole blocks
    # (docs/parity.md): its bytes are read by ours, which reads them as the CUDA kernel does
    from .. import dequantize_4bit, from_bitsandbytes

    return torch.from_numpy(dequantize_4bit(from_bitsandbytes(packed, qs), dtype="float32"))


def dequantized_copy(model, kind: str, double_quant: bool = False, blocksize: int = 64,
                     impl: str = "qlora_ref"):
    r"""A copy of a Hugging Face causal LM whose projections hold dequant(quant(W)).

    .. math::
        \mathbf W \leftarrow \operatorname{dequant}(\operatorname{quant}(\mathbf W))

    ``kind`` is ``"nf4"``, ``"fp4"``, ``"int4"`` (``impl`` ``"qlora_ref"`` or
    ``"bitsandbytes"``; bitsandbytes has no Int4), ``"bfloat16"`` (rounded)
    or ``"float32"`` (unchanged). The layers stay ``nn.Linear``: the model
    computes what :func:`qlora_ref.prepare_model` with :math:`\mathbf B = 0`
    computes (``tests/interop/test_real_model.py`` checks one window), without
    dequantizing at every forward. Every ``nn.Linear`` but the output head
    is a projection; the embedding and the (tied) head stay as they are.
    """
    if impl not in ("qlora_ref", "bitsandbytes", "torch"):
        raise ValueError(f"impl must be 'qlora_ref', 'bitsandbytes' or 'torch', got {impl!r}")
    if kind not in ("float32", "bfloat16", *QUANT_TYPES):
        raise ValueError(f"kind must be 'float32', 'bfloat16', 'nf4', 'fp4' or 'int4', got {kind!r}")
    if impl == "bitsandbytes" and kind == "int4":
        raise ValueError("bitsandbytes has no Int4 storage")
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name in _projections(model):
            w = model.get_submodule(name).weight           # (out, in) float32
            if kind == "bfloat16":
                w.copy_(w.to(torch.bfloat16).to(w.dtype))  # round to nearest even, 8-bit mantissa
            elif kind != "float32":
                w.copy_(_roundtrip(w.detach().float(), kind, double_quant, blocksize,
                                   impl).reshape(w.shape))
    return model


def _weights_digest(model) -> str:
    """SHA-256 of every projection weight's bytes, in module order."""
    digest = hashlib.sha256()
    for name in _projections(model):
        digest.update(model.get_submodule(name).weight.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def real_datatype_table(model_dir, blocksizes=(64,), window: int = 512, max_windows: int = 32,
                        rows=REAL_ROWS, log=None) -> dict:
    """Perplexity of a real model on the pinned text, one row per data type and implementation.

    Parameters
    ----------
    model_dir : path
        A local Hugging Face causal LM folder (``qlora_ref.models.smollm2()``).
    blocksizes : sequence of int, default (64,)
        The 4-bit rows are repeated for each; the 16-bit rows appear once.
    window, max_windows : int
        Tokens per window and how many windows (default 32 of 512: 16,384 tokens).
    rows : sequence of (name, kind, double_quant, impl), default ``REAL_ROWS``
    log : callable, optional
        Called with one line per finished row.

    Returns
    -------
    dict
        ``{"model", "text", "rows"}``; each row ``{"name", "kind",
        "double_quant", "impl", "blocksize", "loss", "perplexity",
        "window_nll" (each window's summed NLL), "weights_sha256",
        "same_weights_as", "seconds"}``.
    """
    from .hf_finetune import load_pretrained
    from .perplexity import perplexity
    from .real_text import TEXTS, load_text, token_windows

    base, tokenizer = load_pretrained(model_dir)
    windows = token_windows(tokenizer, load_text(), window, max_windows)  # (n, window)
    out = {"model": str(model_dir),
           "text": {"files": [name for name, _ in TEXTS], "window": window,
                    "windows": int(windows.shape[0]),
                    "tokens_scored": int(windows.shape[0]) * (window - 1)},
           "rows": []}
    seen = {}
    for blocksize in blocksizes:
        for name, kind, dq, impl in rows:
            if kind in ("float32", "bfloat16") and blocksize != blocksizes[0]:
                continue  # no blocks: once is enough
            start = time.perf_counter()
            model = dequantized_copy(base, kind, dq, blocksize, impl)
            digest = _weights_digest(model)
            row = {"name": name, "kind": kind, "double_quant": dq, "impl": impl,
                   "blocksize": None if kind in ("float32", "bfloat16") else blocksize,
                   "weights_sha256": digest, "same_weights_as": None}
            if digest in seen:  # bit-identical weights: the same forward, the same number
                first = seen[digest]
                row.update(loss=first["loss"], perplexity=first["perplexity"],
                           window_nll=first["window_nll"],
                           same_weights_as=f"{first['name']} (blocksize {first['blocksize']})")
            else:
                result = perplexity(model, windows)
                row.update(loss=result["loss"], perplexity=result["perplexity"],
                           window_nll=result["window_nll"])
                seen[digest] = row
            del model
            row["seconds"] = round(time.perf_counter() - start, 1)
            out["rows"].append(row)
            if log is not None:
                log(f"{name:<26} blocksize {row['blocksize'] or '-':>4}  perplexity "
                    f"{row['perplexity']:.4f}  ({row['seconds']} s)")
    return out


def format_real_table(table: dict) -> str:
    """Markdown: one row per data type and implementation, perplexity and ratio to float32."""
    ref = next(r["perplexity"] for r in table["rows"] if r["kind"] == "float32")
    lines = ["| data type | quantized by | blocksize | perplexity | x float32 | note |",
             "|---|---|---:|---:|---:|---|"]
    for r in table["rows"]:
        note = f"same weights as {r['same_weights_as']}" if r["same_weights_as"] else ""
        lines.append(f"| {r['name']} | {r['impl']} | {r['blocksize'] or '-'} | "
                     f"{r['perplexity']:.4f} | {r['perplexity'] / ref:.4f} | {note} |")
    return "\n".join(lines)


def plot_real_table(table: dict, path) -> Path:
    """Bars of each row's perplexity above float32 (percent), written atomically to ``path``."""
    from matplotlib.figure import Figure

    path = Path(path)
    rows = table["rows"]
    ref = next(r["perplexity"] for r in rows if r["kind"] == "float32")
    colours = {"float32": "#777777", "bfloat16": "#999999", "int4": "#C44E52", "fp4": "#DD8452",
               "nf4": "#4C72B0"}
    fig = Figure(figsize=(7.5, 0.32 * len(rows) + 1.2), dpi=110)
    ax = fig.subplots()
    for i, r in enumerate(rows):
        ax.barh(i, 100.0 * (r["perplexity"] / ref - 1.0), color=colours[r["kind"]],
                hatch="//" if r["double_quant"] else None, edgecolor="white",
                alpha=0.55 if r["impl"] == "bitsandbytes" else 1.0)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [
        f"{r['name']}" + (f" [{r['blocksize']}]" if r["blocksize"] else "") for r in rows],
        fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"perplexity above float32, % ({table['text']['tokens_scored']} tokens; "
                  "hatched: DQ; pale: bitsandbytes)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    return path


def add_arguments(parser):
    """Flags of a ``qlora-ref datatypes`` command."""
    parser.add_argument("--model", metavar="DIR", help="a local Hugging Face causal LM folder, or "
                        "'smollm2' (the optional extra's real model): perplexity on the pinned "
                        "licence texts instead of the tiny GPT's task loss")
    parser.add_argument("--base-model", help="a tiny-GPT base model .safetensors (default: the "
                        "shipped one)")
    parser.add_argument("--n", type=int, default=200, help="tiny GPT: held-out examples per "
                        f"pretraining task (default 200, at most {tasks.EVAL_SIZE})")
    parser.add_argument("--no-accuracy", action="store_true", help="tiny GPT: loss only (faster)")
    parser.add_argument("--windows", type=int, default=32, help="with --model: windows of text "
                        "to score (default 32)")
    parser.add_argument("--window", type=int, default=512, help="with --model: tokens per window "
                        "(default 512)")
    parser.add_argument("--blocksizes", default="64", help="with --model: comma-separated "
                        "blocksizes for the 4-bit rows (default 64)")
    parser.add_argument("--json", metavar="PATH", help="with --model: write the table as JSON "
                        "there")
    parser.add_argument("--plot", metavar="PATH", help="write the bar chart (.png or .svg) there")
    return parser


def run(args) -> int:
    """Run the ``datatypes`` command from parsed arguments; return the exit status (0)."""
    if getattr(args, "model", None):
        return _run_real(args)
    if not 0 < args.n <= tasks.EVAL_SIZE:
        raise ValueError(f"--n must be in 1..{tasks.EVAL_SIZE}, got {args.n}")
    table = datatype_table(args.base_model, n=args.n, accuracy=not args.no_accuracy)
    print(format_datatype_table(table))
    if args.plot:
        print(f"plot: {plot_datatype_table(table, args.plot)}")
    return 0


def _run_real(args) -> int:
    from ..validation import VALID_BLOCKSIZES

    try:
        blocksizes = tuple(int(b) for b in args.blocksizes.split(","))
    except ValueError:
        raise ValueError(f"--blocksizes must be comma-separated integers, got "
                         f"{args.blocksizes!r}") from None
    bad = [b for b in blocksizes if b not in VALID_BLOCKSIZES]
    if bad or not blocksizes:
        raise ValueError(f"--blocksizes must be among {VALID_BLOCKSIZES}, got {args.blocksizes!r}")
    if args.windows < 1 or args.window < 2:
        raise ValueError(f"--windows must be at least 1 and --window at least 2, got "
                         f"{args.windows} and {args.window}")
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    table = real_datatype_table(args.model, blocksizes=blocksizes, window=args.window,
                                max_windows=args.windows, log=log)
    print(format_real_table(table))
    if args.json:
        from .._atomic import write_atomic

        write_atomic(args.json, json.dumps(table, indent=1) + "\n")
        print(f"json: {args.json}")
    if args.plot:
        print(f"plot: {plot_real_table(table, args.plot)}")
    return 0
