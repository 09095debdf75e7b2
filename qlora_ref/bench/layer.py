"""A QLoRA layer's training step, timed: a LoRA layer over a 4-bit base against one over a 16-bit base.

:func:`qlora_layer_step_time` is the "LoRA layer" line under the storage
tables (:func:`qlora_ref.bench.storage.run_benchmarks`); ``docs/benchmarks.md``
cites it.
"""
from __future__ import annotations

import os

from ..backend import default_num_threads
from .timing import measure

__all__ = ["qlora_layer_step_time", "print_layer"]


def qlora_layer_step_time(in_features: int = 4096, out_features: int = 4096, tokens: int = 256,
                          r: int = 16, compute_dtype=None, repeat: int = 5, warmup: int = 1,
                          threads: int | None = None, seed: int = 0) -> dict:
    """Seconds for one forward + backward of a LoRA layer over a 4-bit base vs a 16-bit base.

    Both layers are ``qlora_ref.nn.LoRALinear.from_linear`` of the same
    ``nn.Linear`` (``quant_bits=4``: NF4, blocksize 64, double quantization;
    ``quant_bits=16``: the float weight, frozen). The step is
    ``layer(x).sum().backward()`` on ``x`` of shape ``(tokens, in_features)``
    with ``requires_grad`` (as inside a network). The 4-bit layer dequantizes
    its weight twice per step (forward, and again in backward); the time of
    one ``base_layer.dequantize`` is reported too.

    Returns
    -------
    dict
        ``{"4-bit": s, "16-bit": s, "dequantize": s, "forward 4-bit": s, "forward 16-bit": s}``
        (best of ``repeat``).
    """
    import torch

    from ..nn import LoRALinear

    compute_dtype = compute_dtype or torch.float32
    threads = threads or default_num_threads()
    previous = torch.get_num_threads(), os.environ.get("QLORA_REF_NUM_THREADS")
    torch.set_num_threads(threads)
    os.environ["QLORA_REF_NUM_THREADS"] = str(threads)   # the layer's dequantization kernels
    try:
        torch.manual_seed(seed)
        linear = torch.nn.Linear(in_features, out_features).to(compute_dtype)
        layers = {
            "4-bit": LoRALinear.from_linear(torch.nn.Linear(in_features, out_features),
                                            r=r, quant_bits=4, compute_dtype=compute_dtype),
            "16-bit": LoRALinear.from_linear(linear, r=r, quant_bits=16),
        }
        with torch.no_grad():
            layers["4-bit"].base_layer.bias.copy_(linear.bias.float())
        x = torch.randn(tokens, in_features, dtype=compute_dtype, requires_grad=True)

        def step(layer):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).sum().backward()

        def forward(layer):
            with torch.no_grad():
                layer(x)

        base = layers["4-bit"].base_layer
        rows = {name: (1, lambda layer=layer: step(layer)) for name, layer in layers.items()}
        rows.update({f"forward {name}": (1, lambda layer=layer: forward(layer))
                     for name, layer in layers.items()})
        rows["dequantize"] = (1, lambda: base.dequantize(compute_dtype))
        measured = measure(rows, repeat, warmup)
        return {name: r["seconds"] for name, r in measured.items()}
    finally:
        torch.set_num_threads(previous[0])
        if previous[1] is None:
            del os.environ["QLORA_REF_NUM_THREADS"]
        else:
            os.environ["QLORA_REF_NUM_THREADS"] = previous[1]


def print_layer(threads, repeat, warmup, fmt, say) -> dict:
    """The layer step in float32 on 1 and ``threads`` threads.

    (bfloat16 is left out of the default run: on a CPU without native
    bfloat16 arithmetic torch's bfloat16 matmuls are several times slower
    than float32 and would measure that, not the 4-bit base.)
    """
    out = {}
    say("\nLoRA layer 4096 -> 4096, r=16, 256 tokens, float32, forward + backward "
        f"(x.requires_grad); best of {repeat}:")
    for t in ([1] if threads == 1 else [1, threads]):
        r = qlora_layer_step_time(repeat=repeat, warmup=warmup, threads=t)
        out[f"{t} thr"] = r
        say(f"  {t} thr: step with 4-bit base {r['4-bit'] * 1e3:6.1f} ms, 16-bit base "
            f"{r['16-bit'] * 1e3:6.1f} ms (x{r['4-bit'] / r['16-bit']:.2f}); forward only "
            f"{r['forward 4-bit'] * 1e3:.1f} vs {r['forward 16-bit'] * 1e3:.1f} ms; "
            f"one dequantize of the base {r['dequantize'] * 1e3:.1f} ms (a step does two)")
    return out
