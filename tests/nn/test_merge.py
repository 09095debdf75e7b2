"""Specification of qlora_ref.nn.merge: three ways to merge adapters into a 4-bit base, measured.

Merging into dequant(W4) reproduces the trained (unmerged) model up to
rounding; merging into the original 16-bit W brings back the quantization
error, and re-quantizing the merged weight adds a fresh one. The adapters
here are random with ||dW|| about 5 % of ||W|| (typical of fine-tuning),
while NF4's error is about 9 % of ||W||.

"requantize" is PEFT's merge on a bitsandbytes 4-bit base, quantized once:
checked byte for byte against ``PeftModel.merge_and_unload`` on a model that
transformers loaded with ``BitsAndBytesConfig(load_in_4bit=True)``.
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


# ------------------------------------------------ "requantize" is PEFT's merge on bitsandbytes
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny LLaMA saved with save_pretrained: what transformers loads with BitsAndBytesConfig."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def bitsandbytes_4bit(directory, quant_type, double_quant, dtype=torch.float32):
    """The model as transformers + bitsandbytes load it in 4 bits (on CPU)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                             bnb_4bit_use_double_quant=double_quant,
                                             bnb_4bit_compute_dtype=dtype)
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=config, device_map="cpu", dtype=dtype)


def stored(module) -> dict:
    """The stored bytes of ours or a bitsandbytes Linear4bit, under our buffer names."""
    if isinstance(module, Linear4bit):
        return {"packed": module.packed, "absmax": module.absmax,
                "nested_absmax": module.nested_absmax,
                "offset": None if module.offset is None else module.offset.reshape(())}
    qs = module.weight.quant_state
    nested = qs.state2 is not None
    return {"packed": module.weight.data.reshape(-1), "absmax": qs.absmax,
            "nested_absmax": qs.state2.absmax if nested else None,
            "offset": torch.as_tensor(qs.offset, dtype=torch.float32).reshape(()) if nested
            else None}


@pytest.mark.filterwarnings("ignore:Merge lora module to 4-bit linear")
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
@pytest.mark.parametrize("quant_type, double_quant, dtype", [
    ("nf4", False, torch.float32), ("fp4", False, torch.float32), ("nf4", True, torch.float32),
    ("fp4", True, torch.float32), ("nf4", False, torch.bfloat16)])
def test_requantize_merge_has_the_bytes_of_peft_merge_on_bitsandbytes(llama_dir, tmp_path,
                                                                      quant_type, double_quant,
                                                                      dtype):
    """PEFT's merge_and_unload on a bitsandbytes 4-bit model and ours over the same bytes.

    Our base imports bitsandbytes' layers (same bytes). The 4-bit codes of the
    merged weights must be equal. Without double quantization the float32
    absmax too; with it, bitsandbytes' CPU path takes the offset as a float32
    mean in torch's order and picks 8-bit codes through a lookup
    (tests/interop/test_bitsandbytes_parity.py, module docstring): its offset must lie
    within the float32 summation bound of ours. A bfloat16 model is
    dequantized to bfloat16 before the float32 sum, as PEFT does.
    """
    peft = pytest.importorskip("peft")
    base = bitsandbytes_4bit(llama_dir, quant_type, double_quant, dtype)
    ours = copy.deepcopy(base)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(5)
    theirs = peft.get_peft_model(base, lora)
    theirs.save_pretrained(tmp_path)
    ours = qlora_ref.load_adapter(ours, tmp_path, quant_type=quant_type, double_quant=double_quant)
    names = [n for n, m in ours.named_modules() if isinstance(m, LoRALinear)]
    assert len(names) == 2 * 7
    for name in names:  # the same base to start from
        before = stored(theirs.base_model.model.get_submodule(name).get_base_layer())
        for what, value in stored(ours.get_submodule(name).base_layer).items():
            assert (value is None and before[what] is None) or torch.equal(value, before[what])
    merged_theirs = theirs.merge_and_unload()
    merged_ours = qlora_ref.merge_and_unload(ours, "requantize")
    for name in names:
        a, b = stored(merged_ours.get_submodule(name)), stored(merged_theirs.get_submodule(name))
        assert torch.equal(a["packed"], b["packed"]), \
            f"{name}: {(a['packed'] != b['packed']).sum()} of {a['packed'].numel()} bytes differ"
        if not double_quant:
            assert torch.equal(a["absmax"], b["absmax"]), name
            continue
        n = a["absmax"].numel()  # float32 summation bound of a mean of n positive numbers
        bound = n * 2.0 ** -24 * float(a["offset"])
        assert abs(float(a["offset"]) - float(b["offset"])) <= bound, name


def test_requantize_quantizes_once(models):
    _, model, _ = models
    layer = model[2]
    merged = merge_lora(layer, "requantize")
    once = qlora_ref.quantize_4bit(layer.base_layer.dequantize(torch.float32)
                                   + layer.delta_weight(torch.float32).detach())
    assert torch.equal(merged.packed, torch.from_numpy(once.packed))
    assert torch.equal(merged.dequantize(torch.float32), merged_weight(layer, "requantize"))
