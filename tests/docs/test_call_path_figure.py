"""The call-path figure (docs/_static/call_path.svg) shows the calls a QLoRA layer really makes.

``docs/scripts/call_path_figure.py`` holds the path as data: each hop names the
function called. Here every name is imported, and a real forward and backward
pass of a ``LoRALinear`` over a ``Linear4bit`` on CPU is traced: the functions
the figure names must run in the figure's order, each as often as drawn. The
committed SVG must carry the labels the script draws today.
"""
import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest
import torch

import qlora_ref
from qlora_ref.nn import LoRALinear

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docs" / "scripts" / "call_path_figure.py"
SVG = ROOT / "docs" / "_static" / "call_path.svg"


def _load_script():
    spec = importlib.util.spec_from_file_location("call_path_figure", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


figure = _load_script()
HOPS = figure.FORWARD + figure.BACKWARD


def _svg_labels(svg_text: str) -> list[str]:
    """The strings a matplotlib SVG draws (it writes each one as a comment above its glyphs)."""
    return re.findall(r"<!-- (.*?) -->", svg_text)


@pytest.mark.parametrize("target", sorted({hop.target for hop in HOPS}))
def test_every_hop_names_a_function_that_exists(target):
    assert callable(figure.resolve(target)), target


class CallRecorder:
    """Records, in order, which of the figure's functions run (Python ones by their code
    object through a profiler; compiled ones by a wrapper put where the caller looks them up)."""

    def __init__(self, monkeypatch, targets):
        self.calls = []
        self.codes = {}
        for target in set(targets):
            obj = figure.resolve(target)
            if isinstance(obj, types.FunctionType):  # not a Cython function: its __code__ never runs
                self.codes[obj.__code__] = target
                continue
            owner_name, attr = target.rsplit(".", 1)
            monkeypatch.setattr(figure.resolve(owner_name), attr, self._wrap(obj, target))

    def _wrap(self, fn, target):
        def recorded(*args, **kwargs):
            self.calls.append(target)
            return fn(*args, **kwargs)
        return recorded

    def _profile(self, frame, event, arg):
        if event == "call" and frame.f_code in self.codes:
            self.calls.append(self.codes[frame.f_code])

    def run(self, fn):
        self.calls.clear()
        sys.setprofile(self._profile)
        try:
            fn()
        finally:
            sys.setprofile(None)
        return list(self.calls)


def test_a_forward_and_backward_pass_make_the_calls_the_figure_draws(monkeypatch):
    if qlora_ref.active_backend() != "cython":
        pytest.skip("the figure draws the CPU path with the Cython extension; "
                    f"the active backend is {qlora_ref.active_backend()!r}")
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(torch.nn.Linear(64, 32), r=4, lora_alpha=8)  # NF4, double quant
    torch.nn.init.normal_(layer.lora_B)  # B = 0 at init would leave the adapter path trivial
    x = torch.randn(3, 64, requires_grad=True)  # an earlier layer's output: dX is needed
    recorder = CallRecorder(monkeypatch, [hop.target for hop in HOPS])
    out = {}

    forward = recorder.run(lambda: out.setdefault("y", layer(x)))
    assert forward == [hop.target for hop in figure.FORWARD], forward
    backward = recorder.run(lambda: out["y"].sum().backward())
    assert backward == [hop.target for hop in figure.BACKWARD], backward

    # "grad only to A and B": the 4-bit weight is buffers, the bias is frozen
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}, trainable
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert layer.base_layer.bias.grad is None
    assert {"base_layer.packed", "base_layer.absmax"} <= {n for n, _ in layer.named_buffers()}
    assert x.grad is not None and x.grad.shape == x.shape


def test_the_committed_svg_shows_the_labels_the_script_draws(tmp_path):
    fresh = tmp_path / "call_path.svg"
    figure.draw(fresh)
    drawn = _svg_labels(fresh.read_text(encoding="utf-8"))
    committed = _svg_labels(SVG.read_text(encoding="utf-8"))
    for hop in HOPS:
        assert any(label.endswith(hop.title) for label in drawn), hop.title
    assert committed == drawn, ("docs/_static/call_path.svg is out of date: run "
                                "python docs/scripts/call_path_figure.py")
