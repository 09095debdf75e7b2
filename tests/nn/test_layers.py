"""Specification of the layers: Linear4bit, Linear8bit (frozen bases) and LoRALinear.

* a quantized layer holds exactly the bytes of ``qlora_ref.quantize_4bit`` and
  its ``state_dict`` round-trips them; ``.to(...)`` never changes them;
* LoRALinear starts as the base layer (B = 0), its forward is
  :math:`x (W + \\Delta W)^T`, merge / unmerge use the same :math:`\\Delta W`;
* LoftQ initialisation cancels the rank-r part of the quantization error;
* bad input is a ``ValueError`` naming the layer and the shapes.
"""
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qlora_ref
from qlora_ref.nn import Linear4bit, Linear8bit, LoRALinear
from qlora_ref.nn.autograd import dropout_mask


def make_linear(in_features=48, out_features=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features, bias=bias)


# -- Linear4bit ----------------------------------------------------------------------------

@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_linear4bit_holds_the_bytes_of_quantize_4bit(quant_type, double_quant):
    linear = make_linear()
    layer = Linear4bit.from_linear(linear, quant_type=quant_type, blocksize=64,
                                   double_quant=double_quant)
    state = qlora_ref.quantize_4bit(linear.weight, quant_type=quant_type, blocksize=64,
                                    double_quant=double_quant)
    assert layer.quant_state().equals(state)
    assert layer.nbytes == state.nbytes
    assert torch.equal(layer.dequantize(), torch.from_numpy(qlora_ref.dequantize_4bit(state)))
    x = torch.randn(3, 5, 48)
    assert torch.equal(layer(x), F.linear(x, layer.dequantize(), linear.bias))
    assert not any(p.requires_grad for p in layer.parameters())


def test_linear4bit_state_dict_round_trips_the_packed_bytes_exactly():
    layer = Linear4bit.from_linear(make_linear())
    sd = layer.state_dict()  # bitsandbytes' Linear4bit entries (tests/interop/test_hf_checkpoints.py)
    assert set(sd) == {"weight", "bias", "weight.absmax", "weight.quant_map",
                       "weight.nested_absmax", "weight.nested_quant_map",
                       "weight.quant_state.bitsandbytes__nf4"}
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert sd["weight"].dtype == torch.uint8 and sd["weight.absmax"].dtype == torch.uint8
    assert torch.equal(sd["weight"].reshape(-1), layer.packed)
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    fresh = Linear4bit(48, 40)  # all zeros, right sizes
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.quant_state().equals(layer.quant_state())
    for name, tensor in layer.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(fresh.state_dict()[name], tensor), name
    x = torch.randn(4, 48)
    assert torch.equal(fresh(x), layer(x))


def test_loading_a_state_dict_of_another_format_is_a_value_error():
    sd = Linear4bit.from_linear(make_linear(), quant_type="nf4").state_dict()
    with pytest.raises(ValueError, match="quant_type='nf4'"):
        Linear4bit(48, 40, quant_type="fp4").load_state_dict(sd)


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(),
                                  lambda m: m.double(), lambda m: m.to("cpu"),
                                  lambda m: m.to("cpu", torch.float16)])
def test_to_moves_the_layer_but_never_changes_the_stored_weight(cast):
    layer = Linear4bit.from_linear(make_linear())
    before = {k: v.clone() for k, v in layer.named_buffers()}
    saved = layer.state_dict()
    cast(layer)
    for name in ("packed", "absmax", "code", "nested_absmax", "nested_code", "offset"):
        after = getattr(layer, name)
        assert after.dtype == before[name].dtype and torch.equal(after, before[name]), name
    for key, tensor in layer.state_dict().items():  # and it saves the same bytes
        if key != "bias":
            assert torch.equal(tensor, saved[key]), key
    dtype = layer.bias.dtype  # the frozen bias follows the cast
    out = layer(torch.randn(2, 48, dtype=dtype))
    assert out.dtype == dtype


def test_compute_dtype_casts_the_input_and_the_output_back():
    linear = make_linear()
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 48)
    out = layer(x)
    assert out.dtype == torch.float32
    expected = F.linear(x.bfloat16(), layer.dequantize(torch.bfloat16), linear.bias.bfloat16())
    assert torch.equal(out, expected.float())


@pytest.mark.cuda
def test_linear4bit_to_cuda_dequantizes_the_same_weight():
    layer = Linear4bit.from_linear(make_linear())
    cpu_weight = layer.dequantize()
    layer.to("cuda")
    assert layer.packed.is_cuda and torch.equal(layer.dequantize().cpu(), cpu_weight)
    x = torch.randn(4, 48)
    torch.testing.assert_close(layer(x.cuda()).cpu(), F.linear(x, cpu_weight, layer.bias.cpu()))


# -- Linear8bit ----------------------------------------------------------------------------

def test_linear8bit_holds_blockwise_dynamic_codes_and_round_trips():
    linear = make_linear()
    layer = Linear8bit.from_linear(linear, blocksize=256)
    codes, absmax = qlora_ref.quantize_blockwise(linear.weight.detach().numpy(),
                                                 qlora_ref.dynamic_code(), 256)
    assert np.array_equal(layer.codes.numpy(), codes)
    reference = qlora_ref.dequantize_blockwise(codes, absmax, qlora_ref.dynamic_code(), 256)
    assert torch.equal(layer.dequantize(), torch.from_numpy(reference))
    assert layer.nbytes == 48 * 40 + 4 * math.ceil(48 * 40 / 256)
    fresh = Linear8bit(48, 40, blocksize=256)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.dequantize(), layer.dequantize())
    # 8 bits are much closer to the weight than 4
    w = linear.weight.detach()
    err8 = (layer.dequantize() - w).norm()
    err4 = (Linear4bit.from_linear(linear).dequantize() - w).norm()
    assert err8 < err4 / 5, (float(err8), float(err4))


# -- LoRALinear ----------------------------------------------------------------------------

@pytest.fixture(params=["16bit", "nf4", "int8"])
def base(request):
    linear = make_linear()
    if request.param == "nf4":
        return Linear4bit.from_linear(linear)
    if request.param == "int8":
        return Linear8bit.from_linear(linear)
    return linear


def base_weight(base):
    return base.dequantize() if hasattr(base, "dequantize") else base.weight.detach()


@pytest.mark.parametrize("init", ["lora", "gaussian"])
def test_lora_starts_as_the_base_layer(base, init):
    layer = LoRALinear(base, r=4, lora_alpha=8, init=init)
    assert layer.lora_A.shape == (4, 48) and layer.lora_B.shape == (40, 4)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    x = torch.randn(6, 48)
    assert torch.equal(layer(x), F.linear(x, base_weight(base), base.bias))
    assert layer.scaling == 8 / 4


def test_lora_init_matches_peft_kaiming_uniform():
    linear = make_linear()
    torch.manual_seed(7)
    layer = LoRALinear(linear, r=4)
    torch.manual_seed(7)
    expected = torch.empty(4, 48)
    torch.nn.init.kaiming_uniform_(expected, a=math.sqrt(5))  # PEFT's reset_lora_parameters
    assert torch.equal(layer.lora_A.detach(), expected)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(48)       # the bound 1/sqrt(fan_in)


def test_gaussian_init_has_std_one_over_r():
    layer = LoRALinear(torch.nn.Linear(4096, 8), r=8, init="gaussian")
    assert abs(layer.lora_A.std().item() - 1 / 8) < 0.005


def test_forward_is_x_times_w_plus_delta_weight(base):
    layer = LoRALinear(base, r=4, lora_alpha=12)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 3, 48)
    dense = F.linear(x, base_weight(base) + layer.delta_weight(), base.bias)
    torch.testing.assert_close(layer(x), dense, rtol=1e-5, atol=1e-5)


def test_lora_dropout_applies_to_the_adapter_path_only():
    layer = LoRALinear(Linear4bit.from_linear(make_linear()), r=4, lora_dropout=0.5)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(8, 48)
    torch.manual_seed(3)
    train_out = layer.train()(x)
    torch.manual_seed(3)
    mask = dropout_mask(x, 0.5)
    base_out = F.linear(x, layer.base_layer.dequantize(), layer.base_layer.bias)
    lora_out = F.linear(F.linear(x * mask / 0.5, layer.lora_A), layer.lora_B) * layer.scaling
    expected = base_out + lora_out
    torch.testing.assert_close(train_out, expected)
    eval_out = layer.eval()(x)
    torch.testing.assert_close(eval_out, F.linear(x, layer.base_layer.dequantize()
                                                  + layer.delta_weight(), layer.base_layer.bias))


def test_merge_and_unmerge_on_a_quantized_base_are_exact_round_trips():
    layer = LoRALinear(Linear4bit.from_linear(make_linear()), r=4)
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    packed = layer.base_layer.packed.clone()
    x = torch.randn(5, 48)
    before = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base_layer.packed, packed)   # the 4-bit bytes were never touched
    assert torch.equal(layer(x), before)


def test_merge_and_unmerge_on_a_16bit_base_change_w_in_place():
    linear = make_linear()
    w = linear.weight.detach().clone()
    layer = LoRALinear(linear, r=4)
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(5, 48)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(linear.weight.detach(), w + layer.delta_weight().detach())
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(linear.weight.detach(), w, rtol=0, atol=1e-6)  # up to rounding
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_loftq_init_cancels_the_rank_r_part_of_the_quantization_error():
    linear = make_linear(64, 64)
    w = linear.weight.detach().clone()
    layer = LoRALinear.from_linear(linear, r=8, lora_alpha=16, init="loftq")
    residual = w - layer.base_layer.dequantize()
    after = w - layer.base_layer.dequantize() - layer.delta_weight().detach()
    singular = torch.linalg.svdvals(residual)
    # Eckart-Young: what is left is exactly the energy beyond the top r singular values
    torch.testing.assert_close(after.norm(), singular[8:].norm(), rtol=1e-4, atol=0)
    assert after.norm() < 0.9 * residual.norm()
    x = torch.randn(16, 64)
    assert (layer(x) - linear(x)).norm() < (layer.base_layer(x) - linear(x)).norm()
    # more LoftQ alternations do not lose ground
    layer3 = LoRALinear.from_linear(make_linear(64, 64), r=8, init="loftq", loftq_iters=3)
    after3 = w - layer3.base_layer.dequantize() - layer3.delta_weight().detach()
    assert after3.norm() <= after.norm() * 1.001


def test_bad_lora_arguments_are_value_errors():
    linear = make_linear()
    for r in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="r must be a positive int"):
            LoRALinear(linear, r=r)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRALinear(linear, lora_dropout=1.0)
    with pytest.raises(ValueError, match="init must be one of"):
        LoRALinear(linear, init="xavier")
    with pytest.raises(ValueError, match="needs a quantized base"):
        LoRALinear(linear, init="loftq", weight=linear.weight)
    with pytest.raises(ValueError, match="r <= min"):
        LoRALinear.from_linear(make_linear(8, 6), r=7, init="loftq")
    with pytest.raises(ValueError, match="wraps an nn.Linear"):
        LoRALinear(torch.nn.Conv1d(3, 3, 1))


def test_bad_input_is_a_value_error_naming_layer_and_shapes():
    layer = LoRALinear(Linear4bit.from_linear(make_linear()), r=4)
    layer.name = "blocks.0.attn.q_proj"
    with pytest.raises(ValueError, match=r"'blocks.0.attn.q_proj'.*in_features=48.*"
                                         r"shape \(2, 47\), expected \(\.\.\., 48\)"):
        layer(torch.randn(2, 47))
    with pytest.raises(ValueError, match="floating-point"):
        layer(torch.ones(2, 48, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"Linear4bit\(in_features=48.*shape \(3,\)"):
        layer.base_layer(torch.randn(3))


# -- the forward path: short, and validated once --------------------------------------

def _lora_layer_4bit():
    torch.manual_seed(0)
    return qlora_ref.prepare_model(torch.nn.Sequential(torch.nn.Linear(64, 32)), r=4)[0]


def _chain_to(layer, x, callee, grad):
    """qlora_ref functions between ``LoRALinear.forward`` and the first call of ``callee``."""
    import sys
    chains = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_name == callee and not chains:
            names, f = [], frame
            while f is not None and f.f_code.co_qualname != "LoRALinear.forward":
                if "qlora_ref" in f.f_code.co_filename:
                    names.append(f.f_code.co_qualname)
                f = f.f_back
            chains.append(names[::-1])

    sys.setprofile(profile)
    try:
        with torch.set_grad_enabled(grad):
            layer(x)
    finally:
        sys.setprofile(None)
    assert chains, f"the forward did not reach {callee}"
    return chains[0]


@pytest.mark.skipif(not qlora_ref.cython_available(), reason="the Cython extension is not built")
def test_a_forward_reaches_the_kernel_in_at_most_four_hops():
    """Training: LoRALinear.forward -> QLoRAMatmul.forward -> Linear4bit.dequantize -> run_dequantize_kernel -> kernel."""
    chain = _chain_to(_lora_layer_4bit(), torch.randn(2, 64), "run_dequantize_kernel", grad=True)
    hops = len(chain) + 1  # the qlora_ref functions between the layer and the kernel, + the call
    assert hops <= 4, f"{hops} hops from LoRALinear.forward to the kernel: {chain}"


@pytest.mark.skipif(not qlora_ref.cython_available()
                    or qlora_ref.backend.simd_level() == "portable",
                    reason="the fused kernel needs the extension and an AVX2/AVX-512 CPU")
def test_generation_multiplies_straight_from_the_codes_in_three_hops():
    """No grad, few rows: LoRALinear.forward -> _decode -> one LeanProjection.run (the gemv
    on the codes, the adapters and the bias in one kernel call)."""
    layer, x = _lora_layer_4bit(), torch.randn(2, 64)
    chain = _chain_to(layer, x, "_decode_kernel", grad=False)
    assert [name.split(".")[-1] for name in chain] == ["_decode", "_decode_kernel"], chain
    kernel = layer._decode_kernel(layer.base_layer.fused_plan())
    assert type(kernel).__name__ == "LeanProjection"
    with torch.no_grad():
        fused = layer(x)
    training = layer(x)                                   # grad enabled: dequantize + F.linear
    w = layer.base_layer.dequantize(torch.float64)        # (out, in), the stored weight
    magnitude = x.abs().double() @ w.abs().T + layer.base_layer.bias.abs().double()
    bound = 66 * 2.0 ** -24 * magnitude                   # float32 sums of 64 + bias + adapter
    assert torch.all((fused.double() - training.double()).abs() <= 2 * bound)


def test_the_base_is_checked_once_and_again_after_any_change(monkeypatch):
    from qlora_ref.nn import linear4bit
    layer = _lora_layer_4bit()
    base, calls = layer.base_layer, []
    real = linear4bit.check_quant_tensors
    monkeypatch.setattr(linear4bit, "check_quant_tensors", lambda t: calls.append(1) or real(t))
    x = torch.randn(3, 64, requires_grad=True)
    for _ in range(3):
        layer(x).sum().backward()             # forward and backward both dequantize
    assert len(calls) == 1, f"checked {len(calls)} times for 3 steps"
    base.absmax.add_(0)                        # any in-place write counts as a change
    layer(x)
    assert len(calls) == 2
    with torch.no_grad():
        base.nested_absmax[0] = float("nan")   # a bad value written in place is caught
    with pytest.raises(ValueError, match="nested_absmax"):
        layer(x)
    base.load_state_dict(_lora_layer_4bit().base_layer.state_dict())
    layer(x)                                   # reloaded: checked again, and valid
    assert len(calls) == 4
