"""Specification of qlora_ref.nn.merge: three ways to merge adapters into a 4-bit base, measured.

Merging into dequant(W4) reproduces the trained (unmerged) model up to
rounding; merging into the original 16-bit W brings back the quantization
error, and re-quantizing the merged weight adds a fresh one. The adapters
here are random with ||dW|| about 5 % of ||W|| (typical of fine-tuning),
while NF4's error is about 9 % of ||W||.
"""
import copy

import pytest
import torch

import qlora_ref
from qlora_ref.nn import (MERGE_STRATEGIES, Linear4bit, LoRALinear, merge_and_unload, merge_errors,
                          merge_lora, merged_weight)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    original = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(),
                                   torch.nn.Linear(128, 128), torch.nn.GELU(),
                                   torch.nn.Linear(128, 16))
    model = qlora_ref.prepare_model(copy.deepcopy(original), r=8, lora_alpha=16)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.01)  # as if trained: B != 0
    return original, model, torch.randn(256, 64)


def test_dequant_merge_is_tiny_and_the_others_are_large(models):
    original, model, x = models
    errors = merge_errors(model, x, original)
    assert set(errors) == set(MERGE_STRATEGIES)
    report = {k: f"{v.relative:.2e}" for k, v in errors.items()}
    assert errors["dequant"].relative < 1e-5, report          # float32 rounding only
    assert errors["original"].relative > 1e3 * errors["dequant"].relative, report
    assert errors["requantize"].relative > 1e3 * errors["dequant"].relative, report
    assert errors["original"].relative > 0.02 and errors["requantize"].relative > 0.02, report


def test_dequant_merge_stored_in_bfloat16_is_still_far_better(models):
    original, model, x = models
    errors = merge_errors(model, x, original, dtype=torch.bfloat16)
    report = {k: f"{v.relative:.2e}" for k, v in errors.items()}
    assert errors["dequant"].relative < 1e-2, report          # one bfloat16 rounding of W'
    assert errors["original"].relative > 10 * errors["dequant"].relative, report
    assert errors["requantize"].relative > 10 * errors["dequant"].relative, report


def test_merged_weights_are_the_formulas(models):
    original, model, _ = models
    layer, w = model[2], original[2].weight.detach()
    delta = layer.delta_weight(torch.float32).detach()
    dequant = layer.base_layer.dequantize(torch.float32)
    assert torch.equal(merged_weight(layer, "dequant"), dequant + delta)
    assert torch.equal(merged_weight(layer, "original", original_weight=w), w + delta)
    requant = qlora_ref.quantize_4bit(dequant + delta)
    assert torch.equal(merged_weight(layer, "requantize"),
                       torch.from_numpy(qlora_ref.dequantize_4bit(requant)))


def test_layer_merge_uses_the_dequant_strategy(models):
    _, model, x = models
    layer = copy.deepcopy(model[0])
    standalone = merge_lora(layer, "dequant")
    layer.merge()
    assert torch.equal(layer.merged_weight, standalone.weight)
    assert torch.equal(layer(x), standalone(x))


def test_merge_and_unload_leaves_plain_or_quantized_layers(models):
    original, model, x = models
    plain = merge_and_unload(copy.deepcopy(model), "dequant")
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert isinstance(plain[0], torch.nn.Linear) and not plain[0].weight.requires_grad
    requant = merge_and_unload(copy.deepcopy(model), "requantize")
    assert isinstance(requant[0], Linear4bit)
    from_original = merge_and_unload(copy.deepcopy(model), "original", original)
    torch.testing.assert_close(from_original[0].weight,
                               original[0].weight + model[0].delta_weight().detach())


def test_merge_errors_need_what_they_merge(models):
    original, model, _ = models
    with pytest.raises(ValueError, match="strategy must be one of"):
        merged_weight(model[0], "average")
    with pytest.raises(ValueError, match=r"needs the original weight of shape \(128, 64\)"):
        merged_weight(model[0], "original")
    with pytest.raises(ValueError, match="none given for '0'"):
        merge_and_unload(copy.deepcopy(model), "original", {})
    sixteen = LoRALinear(torch.nn.Linear(8, 8), r=2)
    with pytest.raises(ValueError, match="16-bit base"):
        merged_weight(sixteen, "requantize")
    assert set(merge_errors(sixteen, torch.randn(3, 8))) == {"dequant"}
