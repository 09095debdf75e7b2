"""Reports of a fine-tuning run: ``report.md``, ``report.json`` and ``loss_curve.png``.

``report.md`` shows the loss curve, says what the task is, gives the metrics
before and after fine-tuning with a few example inputs and the model's outputs
before and after, then the setup (parameters, memory, time, configuration).
It serves both the tiny-GPT run (:mod:`qlora_ref.train.finetune`) and the
Hugging Face JSONL run (:mod:`qlora_ref.train.hf_finetune`).
"""
from __future__ import annotations

import json
from pathlib import Path

from .._atomic import atomic_path, write_atomic

__all__ = ["write_report", "format_report", "format_summary", "plot_loss_curves",
           "draw_loss_curves"]


def _mb(n) -> str:
    return f"{n / 1e6:.3f} MB"


def _cell(text) -> str:
    """A value for a Markdown table cell: code-quoted, pipes and newlines escaped, cut at 120 chars."""
    if text is None:
        return "(not evaluated)"
    text = str(text).replace("|", "\\|").replace("\n", "⏎")
    text = text if len(text) <= 120 else text[:117] + "..."
    return f"`{text}`" if text.strip() else "(empty)"


def _task_paragraph(result) -> list[str]:
    c = result.config
    if getattr(c, "dataset_path", ""):
        return [f"The model `{c.base_model}` (Hugging Face, local folder) is fine-tuned on "
                f"{c.train_size} examples of `{c.dataset_path}` (JSONL; at most {c.max_length} "
                f"tokens each, over-long ones {'cut' if c.truncate else 'refused'}). The loss "
                "counts the completion tokens and the end-of-sequence token after them (every "
                "token of a `{\"text\"}` example); prompt tokens and padding are left out. The "
                f"table's loss is over the first {c.eval_size} examples of the file, "
                "teacher-forced; the examples below are the file's first ones, with greedy "
                "completions."]
    from .tasks import get_task

    doc = (get_task(c.task).__doc__ or "").strip().splitlines()
    summary = ": " + doc[0].rstrip(".") if doc else ""  # the docstring's own full stop is ours
    return [f"Task `{c.task}` of `qlora_ref.train.tasks`{summary}. The "
            f"shipped tiny GPT never saw it in pretraining; it is fine-tuned on {c.train_size} "
            "generated examples, the loss counting answer tokens only, and scored on held-out "
            f"prompts ({c.eval_size} of them): exact match of the greedy answer, and the "
            "answer-token loss."]


def format_report(result) -> str:
    """The run's report as markdown: loss curve, the task, metrics and examples before/after, setup."""
    c, p = result.config, result.parameters
    hf = bool(getattr(c, "dataset_path", ""))
    # what the "before" row measured: full fine-tuning starts from the base itself
    start = ("the base model" if c.full_finetune else
             f"{'16-bit' if c.quant_bits == 16 else 'quantized'} base, adapters at zero")
    lines = [f"# Fine-tuning report: {c.method()} on `{c.task}`", "",
             "![training loss](loss_curve.png)", "", "## The task", "", *_task_paragraph(result),
             "", "## Before and after fine-tuning", ""]
    if hf:
        lines += ["| | completion-token loss |", "|---|---:|",
                  f"| before fine-tuning ({start}) | {result.before['loss']:.4f} |",
                  f"| after {result.steps} steps | {result.after['loss']:.4f} |"]
    else:
        lines += [
            "| | exact-match accuracy | answer-token loss |", "|---|---:|---:|",
            *([f"| before fine-tuning ({start}) | {result.before['accuracy']:.3f} | {result.before['loss']:.4f} |"]
              if result.before else []),
            f"| after {result.steps} steps | {result.after['accuracy']:.3f} | {result.after['loss']:.4f} |"]
    examples = getattr(result, "examples", None) or []
    if examples:
        lines += ["", "Examples (greedy decoding):", "",
                  "| input | expected | before | after |", "|---|---|---|---|"]
        lines += [f"| {_cell(e['prompt'])} | {_cell(e['expected'])} | {_cell(e['before'])} | "
                  f"{_cell(e['after'])} |" for e in examples]
    lines += ["", "## Setup", "",
              f"- trainable parameters: {p.get('trainable', 0):,} of {p.get('total', 0):,} "
              f"({100 * p.get('trainable', 0) / max(p.get('total', 1), 1):.2f}%)"]
    if p.get("base_bytes_16bit") and p.get("base_bytes"):
        lines.append(f"- frozen base weights: {_mb(p['base_bytes'])} as stored "
                     f"against {_mb(p['base_bytes_16bit'])} in 16-bit "
                     f"({p['base_bytes_16bit'] / max(p['base_bytes'], 1):.2f}x smaller)")
    lines += [
        f"- device: {result.device}; {result.seconds:.1f} s of training "
        f"({result.steps / max(result.seconds, 1e-9):.1f} steps/s)",
    ]
    if result.peak_memory_bytes is not None:
        lines.append(f"- peak device memory: {_mb(result.peak_memory_bytes)}")
    lines += ["", "Configuration:", "", "```json", json.dumps(result.to_json()["config"], indent=1),
              "```", ""]
    return "\n".join(lines)


def format_summary(result) -> str:
    """A few lines for the terminal: the metrics before and after."""
    before, after = result.before, result.after
    if "accuracy" in after:
        text = (f"exact-match accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, "
                f"answer-token loss {before['loss']:.4f} -> {after['loss']:.4f}"
                if before else f"exact-match accuracy {after['accuracy']:.3f}, answer-token "
                f"loss {after['loss']:.4f}")
    else:
        text = f"completion-token loss {before['loss']:.4f} -> {after['loss']:.4f}"
    return f"{result.config.method()} on {result.config.task}, {result.steps} steps: {text}"


def draw_loss_curves(ax, curves: dict, ylabel: str = "answer-token cross-entropy") -> None:
    """Draw ``{label: [(step, loss), ...]}`` on a matplotlib ``ax``, log-scaled."""
    for label, history in curves.items():
        if history:
            steps, losses = zip(*history)
            ax.plot(steps, losses, label=label, linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=7)


def plot_loss_curves(curves: dict, path, title: str = "Training loss",
                     ylabel: str = "answer-token cross-entropy") -> None:
    """Plot ``{label: [(step, loss), ...]}`` to a PNG (matplotlib, no display needed).

    Written atomically (:func:`qlora_ref._atomic.atomic_path`): a full disk
    or a kill leaves the previous image whole. The format is the suffix of
    ``path`` (PNG without one).
    """
    from matplotlib.figure import Figure  # not pyplot: leaves the caller's backend alone

    fig = Figure(figsize=(6.4, 4.0), dpi=110)
    ax = fig.subplots()
    draw_loss_curves(ax, curves, ylabel)
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix[1:].lower() or "png")


def write_report(result, directory) -> Path:
    """Write ``report.md``, ``report.json`` and ``loss_curve.png`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ylabel = ("completion-token cross-entropy" if getattr(result.config, "dataset_path", "")
              else "answer-token cross-entropy")
    plot_loss_curves({result.config.method(): result.history}, directory / "loss_curve.png",
                     title=f"{result.config.method()} on {result.config.task}", ylabel=ylabel)
    write_atomic(directory / "report.json", json.dumps(result.to_json(), indent=1))
    write_atomic(directory / "report.md", format_report(result))
    return directory / "report.md"


