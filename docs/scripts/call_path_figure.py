"""Draw the call path of one forward and backward pass of a QLoRA layer on CPU.

Run: ``python docs/scripts/call_path_figure.py`` (writes ``docs/_static/call_path.svg``;
``--out PATH`` writes elsewhere). The page ``docs/concepts.md`` shows the figure.

The path is data (:data:`FORWARD`, :data:`BACKWARD`): each hop names the
function that is called by its importable qualified name, in call order.
``tests/docs/test_call_path_figure.py`` imports every name and traces a real
forward and backward pass of a ``LoRALinear`` over a ``Linear4bit`` to check
that these functions, and in this order, are the ones that run.

The case drawn: float32 compute, double quantization on (the paper's
setting), the Cython extension built; bfloat16 compute calls the ``_bf16``
twin of the kernel, and without the extension ``Linear4bit.dequantize``
takes the pure-torch path instead of hops 4 and 5.
"""
from __future__ import annotations

import argparse
import importlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path

from qlora_ref._atomic import write_atomic

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "_static" / "call_path.svg"


@dataclass(frozen=True)
class Hop:
    """One call on the path: the function called, where it lives, what it does there."""

    target: str              # importable qualified name of the callable
    title: str               # the box's heading
    where: str               # file (or library) it is defined in
    does: tuple[str, ...]    # one or two short lines


FORWARD = (
    Hop("qlora_ref.nn.lora.LoRALinear.forward", "LoRALinear.forward(x)", "qlora_ref/nn/lora.py",
        ("checks x, casts it to the compute dtype,", "draws the dropout keep-mask M")),
    Hop("qlora_ref.nn.autograd.QLoRAMatmul.forward", "QLoRAMatmul.forward",
        "qlora_ref/nn/autograd.py  (a torch.autograd.Function)",
        ("saves x, M, A, B for backward,", "never the dequantized weight Ŵ")),
    Hop("qlora_ref.nn.linear4bit.Linear4bit.dequantize", "Linear4bit.dequantize(dtype)",
        "qlora_ref/nn/linear4bit.py",
        ("buffers checked once per change;", "CPU with the extension: the Cython kernel")),
    Hop("qlora_ref.fourbit.run_dequantize_kernel", "fourbit.run_dequantize_kernel",
        "qlora_ref/fourbit.py", ("double-quantized state, float32 out:", "the nested kernel")),
    Hop("qlora_ref._kernels.quant4.dequantize_4bit_packed_nested",
        "quant4.dequantize_4bit_packed_nested", "qlora_ref/_kernels/quant4.pyx (Cython, nogil)",
        ("absmax = nested_code[absmax byte] · nested_absmax + offset",
         "Ŵ = NF4_code[nibble] · absmax  (64 weights per block)")),
    Hop("torch.nn.functional.linear", "F.linear(x, Ŵ, b)", "torch.nn.functional",
        ("base path:  X Ŵᵀ + b",)),
    Hop("torch.nn.functional.linear", "F.linear(d(x), A)", "torch.nn.functional",
        ("adapter path:  H = d(X) Aᵀ,  (…, r)",)),
    Hop("torch.nn.functional.linear", "F.linear(H, B) · s", "torch.nn.functional",
        ("s H Bᵀ,  s = α / r,  added to hop 6's output",)),
)

BACKWARD = (
    Hop("qlora_ref.nn.autograd.QLoRAMatmul.backward", "QLoRAMatmul.backward(G)",
        "qlora_ref/nn/autograd.py", ("G = ∂E/∂Y; reads x, M, A, B",)),
    Hop("qlora_ref.nn.autograd.frozen_weight", "frozen_weight(base, dtype)",
        "qlora_ref/nn/autograd.py", ("only when ∂E/∂X is needed:", "Ŵ is made again")),
    Hop("qlora_ref.nn.linear4bit.Linear4bit.dequantize", "Linear4bit.dequantize(dtype)",
        "qlora_ref/nn/linear4bit.py", ("as in forward hop 3",)),
    Hop("qlora_ref.fourbit.run_dequantize_kernel", "fourbit.run_dequantize_kernel",
        "qlora_ref/fourbit.py", ("as in forward hop 4",)),
    Hop("qlora_ref._kernels.quant4.dequantize_4bit_packed_nested",
        "quant4.dequantize_4bit_packed_nested", "qlora_ref/_kernels/quant4.pyx",
        ("as in forward hop 5",)),
)

#: What the backward returns (matrix products with ``@``, no further calls on the path).
GRADIENTS = (
    "∂E/∂X = G Ŵ + (s G B A) ⊙ M / (1 − p)",
    "∂E/∂A = (s G B)ᵀ d(X)",
    "∂E/∂B = s Gᵀ H",
    "W (NF4 codes, absmax): no gradient, they are buffers",
)


def resolve(target: str):
    """The object a qualified name refers to: the longest importable module, then attributes."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ValueError(f"call_path_figure: no importable module in {target!r}")


# -- drawing -------------------------------------------------------------------------------
# The axes are in inches (1 unit = 1 in). Left column: forward hops 1-6 (the base path);
# right column: the adapter path (7, 8) beside hop 2, then the backward pass.
BOX_W, BOX_H, ROW = 3.7, 0.86, 1.2
LEFT, RIGHT = 0.25, 0.25 + 3.7 + 0.55
WIDTH, HEIGHT = RIGHT + BOX_W + 0.25, 9.4
TOP = HEIGHT - 0.55
FONT = "DejaVu Sans"
COLORS = {"qlora": "#e8f0fb", "kernel": "#fdf0dc", "torch": "#eef6ea"}


def _color(hop: Hop) -> str:
    if hop.target.startswith("torch."):
        return COLORS["torch"]
    return COLORS["kernel"] if "._kernels." in hop.target else COLORS["qlora"]


def _row(k: float) -> float:
    """The top edge of a box in row ``k`` (row 0 is the highest)."""
    return TOP - k * ROW


def _box(ax, x, y, number, hops, does, height=BOX_H):
    """A box with top-left corner (x, y) for one hop (or a run of repeated hops)."""
    from matplotlib.patches import FancyBboxPatch
    ax.add_patch(FancyBboxPatch((x, y - height), BOX_W, height,
                                boxstyle="round,pad=0,rounding_size=0.06",
                                facecolor=_color(hops[0]), edgecolor="#555555", linewidth=0.8))
    line = y - 0.08
    for k, hop in enumerate(hops):
        ax.text(x + 0.08, line, f"{number[k]}  {hop.title}", ha="left", va="top",
                fontsize=8.2, fontweight="bold", family=FONT)
        ax.text(x + 0.36, line - 0.17, hop.where, ha="left", va="top", fontsize=6.3,
                color="#555555", family=FONT)
        line -= 0.36
    for text in does:
        ax.text(x + 0.36, line - 0.02, text, ha="left", va="top", fontsize=7.3, family=FONT)
        line -= 0.165


def _arrow(ax, start, end, label=None, label_side="right"):
    ax.annotate("", xy=end, xytext=start,
                arrowprops=dict(arrowstyle="-|>", color="#333333", linewidth=0.9,
                                shrinkA=0, shrinkB=0))
    if label:
        x, y = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2
        ax.text(x, y + 0.05, label, fontsize=6.5, va="bottom", ha="center", color="#333333",
                style="italic", family=FONT)


def _chain(ax, x, rows, boxes):
    """Boxes in the given rows of one column, each calling the next (arrows between)."""
    for k, (row, (numbers, hops, does)) in enumerate(zip(rows, boxes)):
        _box(ax, x, _row(row), numbers, hops, does)
        if k:
            _arrow(ax, (x + BOX_W / 2, _row(rows[k - 1]) - BOX_H), (x + BOX_W / 2, _row(row)))


def draw(path: Path) -> None:
    """Draw the figure and write it to ``path`` atomically (deterministic SVG bytes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"svg.hashsalt": "qlora_ref-call-path", "svg.fonttype": "path"}):
        fig = plt.figure(figsize=(WIDTH, HEIGHT))
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(0, WIDTH)
        ax.set_ylim(0, HEIGHT)
        ax.axis("off")
        ax.text(LEFT, HEIGHT - 0.18, "Forward:  y = layer(x)", fontsize=10.5, fontweight="bold",
                va="top", family=FONT)

        # forward, base path: hops 1-6 down the left column
        _chain(ax, LEFT, range(6), [((str(k + 1),), (hop,), hop.does)
                                    for k, hop in enumerate(FORWARD[:6])])
        y_sum = _row(5) - BOX_H - 0.42
        _arrow(ax, (LEFT + BOX_W / 2, _row(5) - BOX_H), (LEFT + BOX_W / 2, y_sum + 0.12))
        ax.text(LEFT + BOX_W / 2, y_sum, "Y = X Ŵᵀ + b + s (d(X) Aᵀ) Bᵀ", ha="center",
                va="center", fontsize=9.2, fontweight="bold", family=FONT)
        ax.text(LEFT + BOX_W / 2, y_sum - 0.22, "QLoRA paper, eq. (5)", ha="center", va="center",
                fontsize=6.8, color="#555555", family=FONT)

        # forward, adapter path: hops 7-8 in the right column, called by hop 2 after hop 6
        _chain(ax, RIGHT, (1, 2), [((str(k + 7),), (hop,), hop.does)
                                   for k, hop in enumerate(FORWARD[6:])])
        y_mid = _row(1) - BOX_H / 2
        _arrow(ax, (LEFT + BOX_W, y_mid), (RIGHT, y_mid), "after 6")

        # backward: B1, B2, then B3-B5 (the forward's hops 3-5 again) in one box
        y_head = _row(3) + 0.06
        ax.text(RIGHT, y_head, "Backward:  loss.backward()", fontsize=10.5, fontweight="bold",
                va="bottom", family=FONT)
        b = BACKWARD
        _chain(ax, RIGHT, (3, 4), [(("B1",), (b[0],), b[0].does), (("B2",), (b[1],), b[1].does)])
        repeat_h = 3 * 0.36 + 0.25
        _box(ax, RIGHT, _row(5), ("B3", "B4", "B5"), b[2:],
             ("the forward's hops 3-5 again: Ŵ was not saved",), height=repeat_h)
        _arrow(ax, (RIGHT + BOX_W / 2, _row(4) - BOX_H), (RIGHT + BOX_W / 2, _row(5)))
        y_grad = _row(5) - repeat_h - 0.2
        ax.text(RIGHT + 0.08, y_grad, "returns (products with @, no further calls):",
                fontsize=7.0, color="#555555", va="top", family=FONT)
        for k, line in enumerate(GRADIENTS):
            ax.text(RIGHT + 0.2, y_grad - 0.2 - 0.19 * k, line, fontsize=7.6, va="top",
                    ha="left", family=FONT)

        ax.text(WIDTH - 0.12, 0.1, "float32 compute, double quantization, Cython extension "
                "built. Drawn by docs/scripts/call_path_figure.py", ha="right", va="bottom",
                fontsize=6.0, color="#666666", family=FONT)

        buffer = io.BytesIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
        plt.close(fig)
    write_atomic(path, buffer.getvalue())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="SVG file to write")
    args = parser.parse_args(argv)
    if not args.out.parent.is_dir():
        parser.error(f"--out: directory {args.out.parent} does not exist")
    draw(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
