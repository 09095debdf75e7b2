r"""Merging adapters into a quantized base, three ways, and measuring each.

After QLoRA fine-tuning one wants a single weight per layer. With a 4-bit
base there are three candidates, and only one of them is the function the
adapters were trained for:

.. math::

    \text{dequant:}\quad    & \mathbf W' = \operatorname{dequant}(\mathbf W^{\text{NF4}}) + s\mathbf B\mathbf A
        && \text{(the trained function, up to rounding to 16 bits)} \\
    \text{original:}\quad   & \mathbf W' = \mathbf W + s\mathbf B\mathbf A
        && \text{(error } (\mathbf W - \operatorname{dequant}(\mathbf W^{\text{NF4}}))\,\mathbf x\text{)} \\
    \text{requantize:}\quad & \mathbf W' = \operatorname{dequant}\big(Q(\operatorname{dequant}(\mathbf W^{\text{NF4}}) + s\mathbf B\mathbf A)\big)
        && \text{(a fresh quantization error, which can swallow the update)}

The adapters learned to correct the *quantized* base, quantization error
included, so "original" (what many tools do when they reload the 16-bit
checkpoint) undoes part of what was learned, and "requantize" (PEFT's
``merge`` on a ``Linear4bit``) rounds :math:`\Delta\mathbf W`, typically much
smaller than a quantization step, back to the nearest code.
:func:`merge_errors` reports the output error of each against the unmerged
model.

Note (requantize is PEFT's merge, byte for byte): ``peft.tuners.lora.bnb.Linear4bit.merge``
(peft 0.21) dequantizes the weight to the dtype it was quantized from
(``bitsandbytes.functional.dequantize_4bit``), adds ``get_delta_weight``
(float32 adapters: the sum is float32) and builds a new ``Params4bit`` from
the sum, which ``bitsandbytes.functional.quantize_4bit`` quantizes *once*
with the layer's ``blocksize``, ``quant_type`` and ``compress_statistics``.
:func:`merge_lora` does the same, so from the same base bytes the merged
4-bit codes equal bitsandbytes', and so does every other byte without double
quantization (``tests/nn/test_merge.py``, ``tests/interop/test_hf_architectures.py``).
With double quantization the 8-bit constants carry the known differences of
bitsandbytes' CPU path (its float32 mean for the offset, its code lookup;
``tests/interop/test_bitsandbytes_parity.py``). Metadata differs too: bitsandbytes
records the sum's dtype (float32) as the new weight's dtype, we keep the
base's (or ``dtype``).

Note (fan_in_fan_out): a layer that wraps a ``transformers`` ``Conv1D``
(GPT-2; ``layer.fan_in_fan_out`` is True) stores its weight ``(in, out)``.
The 16-bit merges give back a ``Conv1D`` holding :math:`\mathbf W'^\top`, so
the merged model keeps its class's layout and saves and loads with
``transformers``; "requantize" gives a 4-bit layer, which is ``(out, in)``
in every case (as bitsandbytes stores GPT-2's layers).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn

from .autograd import dense_weight, is_conv1d
from .lora import LoRALinear
from .model import replace_module
from .quantized import QuantizedLinear, as_torch_dtype

__all__ = ["MERGE_STRATEGIES", "merged_weight", "merge_lora", "merge_and_unload", "MergeError",
           "merge_errors"]

#: The three ways to merge (see the module docstring).
MERGE_STRATEGIES = ("dequant", "original", "requantize")


def _base_weight_dtype(layer: LoRALinear) -> torch.dtype:
    base = layer.base_layer
    return base.weight_dtype if isinstance(base, QuantizedLinear) else base.weight.dtype


def _check_merge(layer, strategy: str) -> None:
    if strategy not in MERGE_STRATEGIES:
        raise ValueError(f"strategy must be one of {MERGE_STRATEGIES}, got {strategy!r}")
    if not isinstance(layer, LoRALinear):
        raise ValueError(f"expected a LoRALinear, got {type(layer).__name__}")
    if layer.merged:
        raise ValueError(f"{layer.label()} is merged already; unmerge() it first")
    if not isinstance(layer.base_layer, QuantizedLinear) and strategy != "dequant":
        raise ValueError(f"{layer.label()} has a 16-bit base; strategy {strategy!r} applies only "
                         "to quantized bases")


def merged_weight(layer: LoRALinear, strategy: str = "dequant",
                  original_weight: torch.Tensor | None = None, dtype=None) -> torch.Tensor:
    r"""The merged ``(out, in)`` weight of ``layer`` under ``strategy``, in ``dtype``.

    The sum is formed in float32 and rounded once to ``dtype`` (default: the
    dtype of the weight before quantization); for ``"requantize"`` the sum is
    quantized once (as PEFT + bitsandbytes do) and its dequantization returned,
    so this equals ``merge_lora(layer, "requantize").dequantize(dtype)``. ``"original"`` needs
    ``original_weight``, the 16-bit weight the base was quantized from. On a
    16-bit base all three reduce to :math:`\mathbf W + s\mathbf B\mathbf A` and
    only ``"dequant"`` is accepted.
    """
    _check_merge(layer, strategy)
    base = layer.base_layer
    dtype = _base_weight_dtype(layer) if dtype is None else as_torch_dtype(dtype)
    quantized = isinstance(base, QuantizedLinear)
    with torch.no_grad():
        delta = layer.delta_weight(torch.float32)                       # (out, in)
        if strategy == "original":
            shape = (layer.out_features, layer.in_features)
            if original_weight is None or tuple(original_weight.shape) != shape:
                got = None if original_weight is None else tuple(original_weight.shape)
                raise ValueError(f"{layer.label()}: strategy 'original' needs the original weight "
                                 f"of shape {shape}, got {got}")
            return (original_weight.detach().float() + delta).to(dtype)
        if strategy == "requantize":
            return _requantized(layer, dtype).dequantize(dtype)
        w = base.dequantize(torch.float32) if quantized else dense_weight(base).float()
        merged = w + delta                                              # dequant(W4) + s B A
        return merged.to(dtype)


def _requantized(layer: LoRALinear, dtype=None) -> QuantizedLinear:
    r"""PEFT's 4-bit merge, quantized once.

    .. math::

        Q\big(\operatorname{dequant}(\mathbf W^{\text{NF4}}) + s\mathbf B\mathbf A\big)

    As ``peft.tuners.lora.bnb.Linear4bit.merge``: dequantize to the dtype the
    weight was quantized from, add the update (the sum is float32) and
    quantize that sum with the base's format. ``dtype`` (default the base's
    ``weight_dtype``) is only recorded as the new layer's ``weight_dtype``.
    """
    base = layer.base_layer
    with torch.no_grad():
        w = base.dequantize(base.weight_dtype).float()   # bitsandbytes' dequantize_4bit  (out, in)
        merged = w + layer.delta_weight(torch.float32)   # dequant(W4) + s B A, float32
        new = base.requantize(merged)                    # the one quantization
    new.weight_dtype = base.weight_dtype if dtype is None else as_torch_dtype(dtype)
    new.name = base.name
    return new.requires_grad_(False)


def _conv1d(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A frozen ``transformers`` ``Conv1D`` storing the ``(out, in)`` ``weight`` as ``(in, out)``."""
    from transformers.pytorch_utils import Conv1D

    out_features, in_features = weight.shape
    conv = Conv1D(out_features, in_features).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight.t())                                   # (in, out)
        if bias is None:
            conv.bias = None
        else:
            conv.bias.copy_(bias)
    return conv.requires_grad_(False)


def merge_lora(layer: LoRALinear, strategy: str = "dequant",
               original_weight: torch.Tensor | None = None, dtype=None) -> nn.Module:
    """A standalone layer computing ``layer`` merged.

    An ``nn.Linear`` (a ``transformers`` ``Conv1D`` when ``layer.fan_in_fan_out``,
    so a GPT-2 keeps its layout), or for ``"requantize"`` a quantized layer of
    the base's format holding the merged weight quantized once (PEFT's merge;
    see the module note). The returned layer is frozen; ``layer`` itself is
    not changed.
    """
    base = layer.base_layer
    if strategy == "requantize":
        _check_merge(layer, strategy)
        return _requantized(layer, dtype)
    weight = merged_weight(layer, strategy, original_weight, dtype)     # (out, in)
    if getattr(layer, "fan_in_fan_out", False):
        return _conv1d(weight, base.bias)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if base.bias is not None:
            linear.bias.copy_(base.bias)
    return linear.requires_grad_(False)


def _original_weights(original) -> Mapping:
    if original is None:
        return {}
    if isinstance(original, nn.Module):
        return {name: dense_weight(m) for name, m in original.named_modules()
                if isinstance(m, nn.Linear) or is_conv1d(m)}
    return original



def merge_and_unload(model: nn.Module, strategy: str = "dequant", original=None,
                     dtype=None) -> nn.Module:
    """Replace every :class:`~qlora_ref.nn.LoRALinear` of ``model`` (in place) by its merged layer.

    Parameters
    ----------
    model : nn.Module
    strategy : {"dequant", "original", "requantize"}
    original : nn.Module or dict, optional
        For ``"original"``: the unquantized model (same module paths) or a
        dict ``{module path: weight}``.
    dtype : torch.dtype, optional
        dtype of the merged weights (default: each base's original dtype).
    """
    weights = _original_weights(original)
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        if strategy == "original" and name not in weights:
            raise ValueError(f"strategy 'original' needs the original weight of {module.label()}; "
                             f"none given for '{name}'")
        model = replace_module(model, name, merge_lora(module, strategy, weights.get(name), dtype))
    return model


@dataclass(frozen=True)
class MergeError:
    r"""Output error of a merged model against the unmerged one.

    Attributes
    ----------
    strategy : str
    max_abs : float
        :math:`\max |y' - y|`.
    relative : float
        :math:`\lVert y' - y\rVert_2 / \lVert y\rVert_2`.
    """

    strategy: str
    max_abs: float
    relative: float


def _output(model, inputs) -> torch.Tensor:
    out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach().double()


def merge_errors(model: nn.Module, inputs, original=None, strategies=None,
                 dtype=None) -> dict:
    """Measure each merge strategy: output error of the merged model against the unmerged one.

    The model is copied for each strategy (``model`` is left as it is) and
    run in eval mode on ``inputs``. Merged weights are rounded to ``dtype``
    (default: the original weights' dtype) and then computed in the dtype of
    the layer's adapters, so the numbers isolate the merge itself.

    Parameters
    ----------
    model : nn.Module
        A model with :class:`~qlora_ref.nn.LoRALinear` layers.
    inputs : torch.Tensor or tuple
        Passed to ``model``; an output with ``.logits`` or a tuple is reduced to its tensor.
    original : nn.Module or dict, optional
        Needed for ``"original"`` (see :func:`merge_and_unload`); that
        strategy is skipped when it is None.
    strategies : iterable of str, optional
        Default: all three, or only ``"dequant"`` when every base is 16-bit.
    dtype : torch.dtype, optional

    Returns
    -------
    dict
        ``{strategy: MergeError}``.
    """
    if strategies is None:
        quantized = any(isinstance(m, LoRALinear) and isinstance(m.base_layer, QuantizedLinear)
                        for m in model.modules())
        strategies = MERGE_STRATEGIES if quantized else ("dequant",)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        reference = _output(model, inputs)
        results = {}
        for strategy in strategies:
            if strategy == "original" and original is None:
                continue
            merged = copy.deepcopy(model)
            compute = {name: m.lora_A.dtype for name, m in merged.named_modules()
                       if isinstance(m, LoRALinear)}
            merged = merge_and_unload(merged, strategy, original, dtype)
            for name, m in merged.named_modules():  # store in `dtype`, compute as trained
                if name in compute and (isinstance(m, nn.Linear) or is_conv1d(m)):
                    m.to(compute[name])
            y = _output(merged, inputs)
            results[strategy] = MergeError(strategy, float((y - reference).abs().max()),
                                           float((y - reference).norm() / reference.norm()))
    model.train(was_training)
    return results
