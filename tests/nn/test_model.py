"""Specification of qlora_ref.prepare_model and qlora_ref.trainable_parameters.

prepare_model turns any torch model into a QLoRA model: the chosen
``nn.Linear`` layers (PEFT's matching rules) become LoRA layers over a 4-, 8-
or 16-bit frozen base, everything else is frozen, and the result trains.
"""
import copy

import numpy as np
import pytest
import torch

import qlora_ref
from qlora_ref.nn import Linear4bit, Linear8bit, LoRALinear
from qlora_ref.optim import PagedAdamW
from qlora_ref.train.gpt import GPT, GPTConfig

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=24, block_size=16, n_layer=2, n_head=2, n_embd=32))


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                               torch.nn.Tanh(), torch.nn.Linear(64, 4))


def lora_names(model):
    return sorted(name for name, m in model.named_modules() if isinstance(m, LoRALinear))


def test_all_linear_adapts_every_linear_layer_but_the_output_head():
    model = qlora_ref.prepare_model(tiny_gpt(), r=4)
    expected = sorted(f"blocks.{i}.{part}.{p}" for i in range(2) for p in PROJECTIONS
                      for part in (("attn",) if p.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                                   else ("mlp",)))
    assert lora_names(model) == expected
    assert type(model.lm_head) is torch.nn.Linear and not model.lm_head.weight.requires_grad
    assert all(isinstance(model.get_submodule(n).base_layer, Linear4bit) for n in expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_prepared_model_starts_where_the_base_is_and_runs_forward_and_backward():
    base = tiny_gpt()
    model = qlora_ref.prepare_model(copy.deepcopy(base), r=4, quant_type=None)  # 16-bit base
    idx = torch.randint(0, 24, (3, 10))
    assert torch.equal(model(idx)[0], base(idx)[0])  # B = 0 and the 16-bit base is W itself
    _, loss = model(idx, targets=idx)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}


def test_target_module_names_match_suffixes_like_peft():
    model = qlora_ref.prepare_model(tiny_gpt(), target_modules=["q_proj", "mlp.down_proj"])
    assert lora_names(model) == ["blocks.0.attn.q_proj", "blocks.0.mlp.down_proj",
                                 "blocks.1.attn.q_proj", "blocks.1.mlp.down_proj"]
    regex = qlora_ref.prepare_model(tiny_gpt(), target_modules=r"blocks\.1\..*_proj")
    assert lora_names(regex) == [n for n in lora_names(qlora_ref.prepare_model(tiny_gpt()))
                                 if n.startswith("blocks.1.")]
    head = qlora_ref.prepare_model(tiny_gpt(), target_modules=["lm_head"], quant_type=None)
    assert lora_names(head) == ["lm_head"]  # named explicitly, the head can be adapted


@pytest.mark.parametrize("quant_bits,quant_type,base_type,blocksize", [
    (None, "nf4", Linear4bit, 64), (4, "fp4", Linear4bit, 64), (8, "nf4", Linear8bit, 256),
    (16, "nf4", torch.nn.Linear, None), (None, None, torch.nn.Linear, None)])
def test_quant_bits_choose_the_frozen_base(quant_bits, quant_type, base_type, blocksize):
    model = qlora_ref.prepare_model(mlp(), quant_bits=quant_bits, quant_type=quant_type)
    base = model[0].base_layer
    assert type(base) is base_type
    if blocksize:
        assert base.blocksize == blocksize
    if quant_type == "fp4":
        assert base.quant_type == "fp4"


def test_a_model_made_with_prepare_model_learns_a_task():
    """Fit a teacher that differs from the 4-bit student's base by a rank-2 change per layer."""
    base = mlp()
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for m in teacher:
            if isinstance(m, torch.nn.Linear):
                m.weight += 0.5 * torch.randn(m.out_features, 2) @ torch.randn(2, m.in_features) \
                    / m.in_features ** 0.5
    student = qlora_ref.prepare_model(copy.deepcopy(base), r=4, lora_alpha=8)
    opt = PagedAdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2,
                     page_size=1024)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(120):
        x = torch.randn(128, 16, generator=g)
        loss = torch.nn.functional.mse_loss(student(x), teacher(x).detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = losses[0], sum(losses[-10:]) / 10
    assert end < start / 8, f"loss {start:.4f} -> {end:.4f}; expected below {start / 8:.4f}"
    # the base never moved
    assert np.array_equal(student[0].base_layer.quant_state().packed,
                       Linear4bit.from_linear(base[0]).quant_state().packed)


def test_trainable_parameters_counts_adapters_and_base_bytes():
    base = mlp()
    n_params = sum(p.numel() for p in base.parameters())
    model = qlora_ref.prepare_model(copy.deepcopy(base), r=4)
    count = qlora_ref.trainable_parameters(model)
    assert count.trainable == 4 * (16 + 64) + 4 * (64 + 64) + 4 * (64 + 4)
    assert count.total == n_params + count.trainable  # quantized weights count once each
    weights = 16 * 64 + 64 * 64 + 64 * 4
    assert count.base_params == weights and count.base_bytes_16bit == 2 * weights
    expected_bytes = sum(qlora_ref.quantize_4bit(m.weight).nbytes for m in base
                         if isinstance(m, torch.nn.Linear))
    assert count.base_bytes == expected_bytes
    assert 4.1 < count.bits_per_base_param < 4.2
    assert "trainable params: 1,104" in str(count)
    sixteen = qlora_ref.trainable_parameters(qlora_ref.prepare_model(mlp(), quant_type=None))
    assert sixteen.base_bytes == 4 * weights  # float32 weights, as they are stored


def test_unknown_or_wrong_targets_are_value_errors():
    with pytest.raises(ValueError, match=r"'qkv' is not in the model.*'q_proj'"):
        qlora_ref.prepare_model(tiny_gpt(), target_modules=["q_proj", "qkv"])
    with pytest.raises(ValueError, match=r"ln_1.*LayerNorm.*not an nn.Linear"):
        qlora_ref.prepare_model(tiny_gpt(), target_modules=["ln_1"])
    with pytest.raises(ValueError, match="regex"):
        qlora_ref.prepare_model(tiny_gpt(), target_modules=r"nothing\..*")


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="r must be a positive int"):
        qlora_ref.prepare_model(mlp(), r=0)
    with pytest.raises(ValueError, match="quant_bits must be one of"):
        qlora_ref.prepare_model(mlp(), quant_bits=2)
    with pytest.raises(ValueError, match="needs a quant_type"):
        qlora_ref.prepare_model(mlp(), quant_bits=4, quant_type=None)
    with pytest.raises(ValueError, match="quant_type must be one of"):
        qlora_ref.prepare_model(mlp(), quant_type="nf3")
    with pytest.raises(ValueError, match="blocksize must be one of"):
        qlora_ref.prepare_model(mlp(), blocksize=48)
    prepared = qlora_ref.prepare_model(mlp())
    with pytest.raises(ValueError, match="already has LoRALinear"):
        qlora_ref.prepare_model(prepared)


def test_a_bare_linear_layer_can_be_prepared():
    layer = qlora_ref.prepare_model(torch.nn.Linear(32, 8), r=2)
    assert isinstance(layer, LoRALinear) and isinstance(layer.base_layer, Linear4bit)


def test_compute_dtype_bfloat16_runs_and_keeps_adapter_grads_float32():
    model = qlora_ref.prepare_model(mlp(), r=4, compute_dtype=torch.bfloat16)
    out = model(torch.randn(5, 16))
    assert out.dtype == torch.float32
    out.sum().backward()
    assert model[0].lora_B.grad.dtype == torch.float32


def test_loftq_init_starts_closer_to_the_16bit_model():
    base = mlp()
    x = torch.randn(64, 16)
    target = base(x).detach()
    plain = qlora_ref.prepare_model(copy.deepcopy(base), r=4)
    loftq = qlora_ref.prepare_model(copy.deepcopy(base), r=4, init="loftq")
    plain_error = (plain(x) - target).norm()
    loftq_error = (loftq(x) - target).norm()
    assert loftq_error < 0.9 * plain_error, (float(loftq_error), float(plain_error))
