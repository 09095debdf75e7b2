"""Reports of a fine-tuning run: ``report.md``, ``report.json`` and ``loss_curve.png``."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_report", "format_report", "plot_loss_curves", "draw_loss_curves"]


def _mb(n) -> str:
    return f"{n / 1e6:.3f} MB"


def format_report(result) -> str:
    """The run's report as markdown: accuracy and loss before/after, parameters, memory, time."""
    c, p = result.config, result.parameters
    lines = [
        f"# Fine-tuning report: {c.method()} on task `{c.task}`",
        "",
        "| | exact-match accuracy | answer-token loss |",
        "|---|---:|---:|",
        *([f"| before fine-tuning (quantized base, adapters at zero) | {result.before['accuracy']:.3f} | {result.before['loss']:.4f} |"]
          if result.before else []),
        f"| after {result.steps} steps | {result.after['accuracy']:.3f} | {result.after['loss']:.4f} |",
        "",
        f"- trainable parameters: {p.get('trainable', 0):,} of {p.get('total', 0):,} "
        f"({100 * p.get('trainable', 0) / max(p.get('total', 1), 1):.2f}%)",
    ]
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


def plot_loss_curves(curves: dict, path, title: str = "Training loss") -> None:
    """Plot ``{label: [(step, loss), ...]}`` to a PNG (matplotlib, no display needed)."""
    from matplotlib.figure import Figure  # not pyplot: leaves the caller's backend alone

    fig = Figure(figsize=(6.4, 4.0), dpi=110)
    ax = fig.subplots()
    draw_loss_curves(ax, curves)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)


def write_report(result, directory) -> Path:
    """Write ``report.md``, ``report.json`` and ``loss_curve.png`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.md").write_text(format_report(result))
    (directory / "report.json").write_text(json.dumps(result.to_json(), indent=1))
    plot_loss_curves({result.config.method(): result.history}, directory / "loss_curve.png",
                     title=f"{result.config.method()} on {result.config.task}")
    return directory / "report.md"
