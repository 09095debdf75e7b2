r"""The 4-bit data types on the shipped base model, without fine-tuning.

The miniature of the QLoRA paper's data-type comparison (Dettmers et al.
2023, sec. 5.1, Table 2 and Figure 3): quantize every projection of a
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
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch

from .._atomic import atomic_path
from ..nn import prepare_model
from . import tasks
from .pretrain import load_base_model

__all__ = ["ROWS", "quantize_model", "datatype_table", "format_datatype_table",
           "plot_datatype_table", "add_arguments", "run"]

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
    if kind not in ("nf4", "fp4", "int4"):
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


def add_arguments(parser):
    """Flags of a ``qlora-ref datatypes`` command."""
    parser.add_argument("--base-model", help="a base model .safetensors (default: the shipped one)")
    parser.add_argument("--n", type=int, default=200, help="held-out examples per pretraining "
                        f"task (default 200, at most {tasks.EVAL_SIZE})")
    parser.add_argument("--no-accuracy", action="store_true", help="loss only (faster)")
    parser.add_argument("--plot", metavar="PATH", help="write the bar chart (.png or .svg) there")
    return parser


def run(args) -> int:
    """Run the ``datatypes`` command from parsed arguments; return the exit status (0)."""
    if not 0 < args.n <= tasks.EVAL_SIZE:
        raise ValueError(f"--n must be in 1..{tasks.EVAL_SIZE}, got {args.n}")
    table = datatype_table(args.base_model, n=args.n, accuracy=not args.no_accuracy)
    print(format_datatype_table(table))
    if args.plot:
        print(f"plot: {plot_datatype_table(table, args.plot)}")
    return 0
