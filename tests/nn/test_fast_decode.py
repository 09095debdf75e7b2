"""The lean decoding path of ``LoRALinear`` (no grad, a 4-bit base, a few rows) against its readable twin.

The twin is :class:`~qlora_ref.nn.QLoRAMatmul`'s forward (dequantize +
``F.linear``, the adapters in the compute dtype); the lean path is
``Linear4bit.fused_matmul`` (the ``gemv_4bit`` kernel) plus the adapters in
float32, rounded once. Bounds (Higham, "Accuracy and Stability of Numerical
Algorithms", section 3.1): a float32 dot product of ``n`` terms is off by at
most :math:`\\gamma_n = n u / (1 - n u)`, :math:`u = 2^{-24}`, times the sum of
the absolute terms; two such paths differ by at most twice that. A rounding to
bfloat16 adds :math:`u = 2^{-8}` relative.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qlora_ref
from qlora_ref.nn import Linear4bit, LoRALinear, qlora_linear

needs_kernel = pytest.mark.skipif(
    not qlora_ref.cython_available() or qlora_ref.backend.simd_level() == "portable",
    reason="the fused kernel needs the extension and an AVX2/AVX-512 CPU")


def _layer(in_blocks, out, r, bias, seed, compute_dtype=None):
    torch.manual_seed(seed)
    layer = LoRALinear.from_linear(torch.nn.Linear(64 * in_blocks, out, bias=bias), r=r,
                                   lora_alpha=2 * r, compute_dtype=compute_dtype)
    with torch.no_grad():
        layer.lora_B.normal_()          # a real update (B = 0 would hide the adapter branch)
        if bias:
            layer.base_layer.bias.normal_()
    return layer.eval()


def _magnitude(layer, x):
    """Sum of absolute terms of every output: |x||W|^T + |b| + s (|x||A|^T)|B|^T, float64."""
    x = x.double().abs().reshape(-1, layer.in_features)                       # (rows, in)
    w = layer.base_layer.dequantize(torch.float32).double().abs()              # (out, in)
    m = x @ w.T + s_abs(layer, x)
    if layer.base_layer.bias is not None:
        m = m + layer.base_layer.bias.double().abs()
    return m


def s_abs(layer, x_abs):
    return layer.scaling * (x_abs @ layer.lora_A.double().abs().T) @ layer.lora_B.double().abs().T


def _gamma(n, u=2.0 ** -24):
    return n * u / (1 - n * u)


def _twin(layer, x):
    """The readable path: QLoRAMatmul's forward, as training computes it."""
    base = layer.base_layer
    xc = x.to(base.compute_dtype or x.dtype)
    return qlora_linear(xc, base, base.bias, layer.lora_A, layer.lora_B, layer.scaling).to(x.dtype)


@needs_kernel
@settings(max_examples=20, deadline=None)
@given(in_blocks=st.integers(1, 4), out=st.integers(1, 40), r=st.integers(1, 8),
       rows=st.integers(1, 5), lead=st.booleans(), bias=st.booleans(), seed=st.integers(0, 99))
def test_lean_path_equals_the_twin_within_the_float32_sum_bound(in_blocks, out, r, rows, lead,
                                                                bias, seed):
    layer = _layer(in_blocks, out, r, bias, seed)
    x = torch.randn((1, rows, layer.in_features) if lead else (rows, layer.in_features))
    with torch.no_grad():
        assert layer._decode(x) is not None, "the lean path was not taken"
        fast = layer(x)
        twin = _twin(layer, x)
    assert fast.shape == twin.shape == (*x.shape[:-1], out) and fast.dtype == torch.float32
    bound = 2 * _gamma(layer.in_features + r + 3) * _magnitude(layer, x)
    err = (fast.double() - twin.double()).reshape(-1, out).abs()
    assert torch.all(err <= bound), f"max error {err.max():.3g} over the bound {bound.max():.3g}"


@needs_kernel
@settings(max_examples=15, deadline=None)
@given(in_blocks=st.integers(1, 4), out=st.integers(1, 40), rows=st.integers(1, 4),
       seed=st.integers(0, 99))
def test_lean_path_in_bfloat16_is_within_the_bfloat16_rounding_bound(in_blocks, out, rows, seed):
    layer = _layer(in_blocks, out, 4, True, seed, compute_dtype=torch.bfloat16)
    x = torch.randn(rows, layer.in_features).to(torch.bfloat16)
    with torch.no_grad():
        fast = layer(x)
        twin = _twin(layer, x)
    assert fast.dtype == twin.dtype == torch.bfloat16
    # the twin rounds the base output, A, B, h, the product and the sum to bfloat16 (6 u);
    # the lean path rounds once (u); both sum in float32
    bound = (7 * 2.0 ** -8 + 2 * _gamma(layer.in_features + 7)) * _magnitude(layer, x)
    err = (fast.double() - twin.double()).abs()
    assert torch.all(err <= bound), f"max error {err.max():.3g} over the bound {bound.max():.3g}"


@needs_kernel
def test_same_kernel_gives_the_same_bytes():
    """With B = 0 and no bias the lean path is the kernel's output: byte-equal to matmul_few_rows."""
    torch.manual_seed(1)
    layer = LoRALinear.from_linear(torch.nn.Linear(192, 70, bias=False), r=8).eval()
    x = torch.randn(3, 192)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer.matmul_few_rows(x))
        base = layer.base_layer
        plan = base.fused_plan()
        assert torch.equal(base.fused_matmul(x, plan), base.matmul_few_rows(x))


def test_the_grad_path_is_unchanged():
    """With a gradient, the forward is QLoRAMatmul's, bytes and backward."""
    layer = _layer(2, 24, 4, True, 0)
    x = torch.randn(3, 128, requires_grad=True)
    out = layer(x)
    assert out.grad_fn is not None and torch.equal(out, _twin(layer, x))
    out.sum().backward()
    assert layer.lora_A.grad is not None and x.grad is not None


@needs_kernel
def test_the_plan_follows_every_change_of_the_weight():
    layer, other = _layer(2, 24, 4, False, 0), _layer(2, 24, 4, False, 1)
    x = torch.randn(2, 128)
    with torch.no_grad():
        before = layer(x)
        layer.base_layer.load_state_dict(other.base_layer.state_dict())   # bytes copied in place
        after = layer(x)
        expected = _twin(layer, x)
        bound = 2 * _gamma(128 + 4 + 3) * _magnitude(layer, x)
        assert torch.all((after.double() - expected.double()).abs() <= bound)
        assert not torch.equal(before, after)
        layer.base_layer.packed.fill_(0x77)    # written in place: every code is NF4's 0.0
        zero_w = (layer(x) - _lora(layer, x)).abs()                        # W is now 0:
        assert torch.all(zero_w <= 2 * _gamma(128 + 4 + 3) * _magnitude(layer, x))  # sum order only
        layer.base_layer.nested_absmax[0] = float("nan")   # a bad value: checked again
        with pytest.raises(ValueError, match="nested_absmax"):
            layer(x)


def _lora(layer, x):
    """The adapter branch alone, in float32: s (x A^T) B^T."""
    return torch.addmm(torch.zeros(x.shape[0], layer.out_features), x @ layer.lora_A.T,
                       layer.lora_B.T, alpha=layer.scaling)


@needs_kernel
def test_the_numpy_backend_turns_the_lean_path_off(monkeypatch):
    layer = _layer(1, 8, 2, True, 0)
    x = torch.randn(1, 64)
    with torch.no_grad():
        assert layer._decode(x) is not None
        monkeypatch.setenv("QLORA_REF_BACKEND", "numpy")
        assert layer._decode(x) is None
        assert torch.equal(layer(x), _twin(layer, x))


def test_no_lean_path_for_many_rows_float64_or_dropout():
    layer = _layer(1, 8, 2, False, 0)
    with torch.no_grad():
        assert layer._decode(torch.randn(Linear4bit.FUSED_MAX_ROWS + 1, 64)) is None
        assert layer._decode(torch.randn(2, 64, dtype=torch.float64)) is None
    dropped = LoRALinear.from_linear(torch.nn.Linear(64, 8), r=2, lora_dropout=0.5).train()
    x = torch.randn(2, 64)
    with torch.no_grad():
        dropped.lora_B.normal_()               # B = 0 would hide the dropout
        a, b = dropped(x), dropped(x)
    assert not torch.equal(a, b), "training with dropout must not take the deterministic path"


@needs_kernel
def test_a_copy_leaves_the_plan_behind_and_decodes_the_same():
    import copy
    import io

    layer = _layer(2, 16, 4, True, 3)
    x = torch.randn(1, 128)
    with torch.no_grad():
        y = layer(x)
        assert layer.base_layer._plan is not None
        twin = copy.deepcopy(layer)
        assert twin.base_layer._plan is None
        assert torch.equal(twin(x), y)
        buffer = io.BytesIO()
        torch.save(layer.state_dict(), buffer)
        buffer.seek(0)
        fresh = _layer(2, 16, 4, True, 4)
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        assert torch.equal(fresh(x), y)
