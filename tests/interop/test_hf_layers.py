"""Specification of the layers transformers models bring: GPT-2's Conv1D and bitsandbytes' Linear4bit.

* GPT-2 (``transformers.pytorch_utils.Conv1D``, weight ``(in, out)``):
  ``prepare_model``'s ``"all-linear"`` wraps exactly what PEFT's does, with
  ``fan_in_fan_out = True``; a 16-bit base leaves the outputs unchanged bit for
  bit; a 4-bit base holds the bytes bitsandbytes makes of :math:`\\mathbf W`
  (the transposed storage); with random adapters the logits are PEFT's;
  training moves only the adapters.
* A model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``: its
  ``bitsandbytes.nn.Linear4bit`` layers are imported with their bytes
  unchanged, and the base computes what bitsandbytes' layer computes.
* A model with nothing to wrap, or a layer quantized otherwise, is a
  ``ValueError`` that says so.
"""
import copy

import pytest
import torch

from qlora_ref.nn import Linear4bit, prepare_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from transformers.pytorch_utils import Conv1D  # noqa: E402
from tests.helpers import lora_layers, peft_layers, randomize_adapters, tiny_gpt2, tokens

ADAPTER_SCALE = 0.1  # B ~ 0.1 * N(0, 1): trained-looking adapters (tests.helpers.randomize_adapters)

R, ALPHA = 4, 8


def peft_lora(model):
    """PEFT's LoRA model over ``model`` with all-linear targets (fan_in_fan_out for GPT-2)."""
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                             fan_in_fan_out=True, lora_dropout=0.0)
    return peft.get_peft_model(model, config).eval()


def copy_adapters_into_peft(ours, theirs):
    with torch.no_grad():
        for name, peft_layer in peft_layers(theirs).items():
            peft_layer.lora_A["default"].weight.copy_(lora_layers(ours)[name].lora_A)
            peft_layer.lora_B["default"].weight.copy_(lora_layers(ours)[name].lora_B)


# -- GPT-2's Conv1D -------------------------------------------------------------------------

def test_gpt2_all_linear_wraps_exactly_the_layers_peft_wraps():
    ours = prepare_model(tiny_gpt2(), r=R, lora_alpha=ALPHA)
    theirs = peft_layers(peft_lora(tiny_gpt2()))
    assert set(lora_layers(ours)) == set(theirs) and len(theirs) == 8
    for name, layer in lora_layers(ours).items():
        assert layer.fan_in_fan_out is True, name
        assert isinstance(layer.base_layer, Linear4bit), name
        peft_layer = theirs[name]
        assert layer.lora_A.shape == peft_layer.lora_A["default"].weight.shape, name  # (r, in)
        assert layer.lora_B.shape == peft_layer.lora_B["default"].weight.shape, name  # (out, r)
    plain = prepare_model(torch.nn.Sequential(torch.nn.Linear(8, 4)), r=2, target_modules=["0"])
    assert plain[0].fan_in_fan_out is False


def test_gpt2_named_and_regex_targets_select_conv1d_layers():
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    by_name = prepare_model(tiny_gpt2(), r=R, target_modules=["c_attn"])
    by_regex = prepare_model(tiny_gpt2(), r=R, target_modules=r".*\.attn\.c_attn")
    assert sorted(lora_layers(by_name)) == sorted(lora_layers(by_regex)) == names


def test_gpt2_with_a_16bit_base_and_b_zero_computes_the_original_model_exactly():
    original = tiny_gpt2()
    prepared = prepare_model(copy.deepcopy(original), r=R, lora_alpha=ALPHA, quant_type=None)
    assert all(isinstance(m.base_layer, Conv1D) for m in lora_layers(prepared).values())
    x = tokens()
    with torch.no_grad():
        assert torch.equal(prepared(x).logits, original(x).logits)


@pytest.mark.parametrize("double_quant", [False, True])
def test_gpt2_4bit_base_holds_the_bitsandbytes_bytes_of_the_transposed_weight(double_quant):
    # with double quantization only the 4-bit codes are compared: bitsandbytes' CPU offset is a
    # differently summed float32 mean (tests/interop/test_bitsandbytes_parity.py bounds the constants)
    original = tiny_gpt2()
    prepared = prepare_model(copy.deepcopy(original), r=R, double_quant=double_quant)
    for name, layer in lora_layers(prepared).items():
        conv = original.get_submodule(name)
        packed, state = bnb.functional.quantize_4bit(conv.weight.detach().T.contiguous(),
                                                     blocksize=64, quant_type="nf4",
                                                     compress_statistics=double_quant)
        base = layer.base_layer
        assert (base.out_features, base.in_features) == tuple(state.shape) == (
            conv.nf, conv.weight.shape[0])
        assert torch.equal(base.packed, packed.reshape(-1)), name
        if not double_quant:
            assert torch.equal(base.absmax, state.absmax), name
            assert torch.equal(base.dequantize(), bnb.functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("quant_type", [None, "nf4"])
def test_gpt2_with_random_adapters_gives_the_logits_of_peft(quant_type):
    original = tiny_gpt2()
    ours = prepare_model(copy.deepcopy(original), r=R, lora_alpha=ALPHA, quant_type=quant_type)
    randomize_adapters(ours, ADAPTER_SCALE)
    base = copy.deepcopy(original)
    if quant_type is not None:  # PEFT over the same (dequantized) base
        with torch.no_grad():
            for name, layer in lora_layers(ours).items():
                base.get_submodule(name).weight.copy_(layer.base_layer.dequantize().T)
    theirs = peft_lora(base)
    copy_adapters_into_peft(ours, theirs)
    x = tokens()
    with torch.no_grad():
        got, expected = ours(x).logits, theirs(x).logits
    assert (expected - original(x).logits).abs().max() > 1e-3  # the adapters do change the output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gpt2_merge_and_unmerge_of_a_16bit_conv1d_base():
    original = tiny_gpt2()
    prepared = prepare_model(copy.deepcopy(original), r=R, lora_alpha=ALPHA, quant_type=None)
    randomize_adapters(prepared, ADAPTER_SCALE)
    x = tokens()
    with torch.no_grad():
        unmerged = prepared(x).logits
        for layer in lora_layers(prepared).values():
            layer.merge()
        merged = prepared(x).logits
        for layer in lora_layers(prepared).values():
            layer.unmerge()
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    for name, layer in lora_layers(prepared).items():  # W - delta restores W up to rounding
        torch.testing.assert_close(layer.base_layer.weight, original.get_submodule(name).weight,
                                   rtol=0, atol=1e-6)


def test_gpt2_training_lowers_the_loss_and_moves_only_the_adapters():
    model = prepare_model(tiny_gpt2(), r=R, lora_alpha=ALPHA).train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = tokens(shape=(4, 16))
    losses = []
    for _ in range(8):
        loss = model(x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert losses[-1] < losses[0] - 0.05, losses
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k]), k


# -- bitsandbytes-loaded models -------------------------------------------------------------

BNB_KW = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2().save_pretrained(directory)
    return directory


def load_4bit(directory, **kw):
    config = transformers.BitsAndBytesConfig(**{**BNB_KW, **kw})
    return transformers.AutoModelForCausalLM.from_pretrained(directory, quantization_config=config,
                                                             device_map="cpu")


def test_a_bitsandbytes_4bit_model_is_imported_without_quantizing_again(saved_gpt2):
    model = load_4bit(saved_gpt2)
    bnb_layers = {name: m for name, m in model.named_modules()
                  if isinstance(m, bnb.nn.Linear4bit)}
    saved = {name: {k: v.clone() for k, v in m.state_dict().items()}
             for name, m in bnb_layers.items()}
    prepared = prepare_model(model, r=R, lora_alpha=ALPHA)
    assert set(lora_layers(prepared)) == set(bnb_layers) and len(bnb_layers) == 8
    g = torch.Generator().manual_seed(3)
    for name, layer in lora_layers(prepared).items():
        ours, theirs = layer.base_layer.state_dict(), saved[name]
        assert set(ours) == set(theirs), name
        for key in theirs:  # bitsandbytes' own serialization of its layer, byte for byte
            assert torch.equal(ours[key], theirs[key]), (name, key)
        bnb_layer = bnb_layers[name].train()  # train mode: bitsandbytes never repacks (see below)
        w = bnb.functional.dequantize_4bit(bnb_layer.weight.data, bnb_layer.weight.quant_state)
        assert torch.equal(layer.base_layer.dequantize(), w), name
        x = torch.randn(3, 5, layer.in_features, generator=g)
        with torch.no_grad():
            got, expected = layer.base_layer(x), bnb_layer(x)
        # same weight, same bias; only float32 summation order may differ:
        # |error| <= in_features * eps * sum_i |x_i w_i| (each of in_features additions rounds once)
        bound = layer.in_features * torch.finfo(torch.float32).eps * (x.abs() @ w.abs().T)
        assert ((got - expected).abs() <= bound + 1e-30).all(), name


def test_a_bitsandbytes_layer_after_its_first_forward_is_imported_too(saved_gpt2):
    model = load_4bit(saved_gpt2).train()  # train mode (no dropout): the forward stores nothing
    x = tokens()
    with torch.no_grad():
        before = model(x).logits
    layer = model.transformer.h[0].attn.c_attn
    expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    prepared = prepare_model(model, r=R, lora_alpha=ALPHA)
    assert torch.equal(prepared.transformer.h[0].attn.c_attn.base_layer.dequantize(), expected)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x).logits, before, rtol=1e-5, atol=1e-5)


def test_a_layer_bitsandbytes_repacked_for_its_cpu_kernel_is_imported_as_it_now_computes(saved_gpt2):
    # what an eval-mode forward does on a CPU with AVX512-BF16 (bitsandbytes 0.50.2), forced
    # here so that the test does not depend on the host
    model = load_4bit(saved_gpt2)
    layer = model.transformer.h[0].attn.c_attn
    qs = layer.weight.quant_state
    codes = layer.weight.data.reshape(-1).clone()                    # bitsandbytes' packed bytes
    absmax = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset  # float32
    layer.weight.data, layer.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
        layer.weight.data, qs)
    assert layer.weight.quant_state.absmax.dtype == torch.bfloat16  # the lossy step
    assert not torch.equal(layer.weight.data.reshape(-1), codes)    # and the codes are tiled
    prepared = prepare_model(model, r=R, lora_alpha=ALPHA)           # double_quant=True asked
    base = prepared.transformer.h[0].attn.c_attn.base_layer
    assert not base.double_quant                                     # bitsandbytes dropped it
    assert torch.equal(base.packed, codes)                           # the codes, back in order
    assert torch.equal(base.absmax, absmax.to(torch.bfloat16).float())  # what it now holds
    # the other layers were never repacked: imported with their double quantization
    assert prepared.transformer.h[0].mlp.c_fc.base_layer.double_quant


def test_a_bitsandbytes_layer_of_another_format_than_asked_is_a_value_error(saved_gpt2):
    model = load_4bit(saved_gpt2, bnb_4bit_quant_type="fp4")
    with pytest.raises(ValueError, match="already quantized by bitsandbytes.*'quant_type': 'nf4'"):
        prepare_model(model, r=R, quant_type="nf4")
    assert not lora_layers(model)  # nothing was changed
    prepared = prepare_model(model, r=R, quant_type="fp4")
    assert all(m.base_layer.quant_type == "fp4" for m in lora_layers(prepared).values())


def test_a_layer_quantized_by_another_scheme_is_named_in_a_value_error():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32),
                                bnb.nn.Linear8bitLt(32, 16, has_fp16_weights=False).to("cpu"))
    assert model[1].weight.dtype == torch.int8
    with pytest.raises(ValueError, match=r"layer '1' \(bitsandbytes\.nn\.modules\.Linear8bitLt\)"
                                         r" holds a torch\.int8 weight"):
        prepare_model(model, r=R)
    assert not lora_layers(model)


def test_a_model_with_nothing_for_all_linear_is_a_value_error():
    class ConvNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)

    with pytest.raises(ValueError, match="all-linear' found no layer to wrap in ConvNet.*"
                                         "nn.Linear.*Conv1D"):
        prepare_model(ConvNet(), r=R)
