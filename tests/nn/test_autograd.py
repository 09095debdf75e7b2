"""Specification of qlora_ref.nn.autograd.QLoRAMatmul: the hand-written backward.

* gradients pass ``torch.autograd.gradcheck`` in float64 (4-, 8- and 16-bit bases,
  with and without a dropout mask);
* outputs and gradients equal a plain-autograd dense reference;
* between forward and backward only the input, the mask and the adapters are
  kept -- never a tensor of the weight's shape ``(out, in)`` -- and the
  backward dequantizes the weight again only if the input needs a gradient.
"""
import pytest
import torch
import torch.nn.functional as F

from qlora_ref.nn import Linear4bit, Linear8bit, LoRALinear, QLoRAMatmul, qlora_linear
from qlora_ref.nn.autograd import dropout_mask

IN, OUT, R, SCALING, P = 12, 10, 3, 2.5, 0.25

def make_base(kind, in_features=IN, out_features=OUT, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features)
    if kind == "nf4":
        return Linear4bit.from_linear(linear, blocksize=32)
    if kind == "int8":
        return Linear8bit.from_linear(linear, blocksize=64)
    return linear.requires_grad_(False)


def weight_of(base, dtype):
    return base.dequantize(dtype) if hasattr(base, "dequantize") else base.weight.to(dtype)


def dense_reference(x, base, bias, A, B, scaling, mask, p):
    """Plain autograd through the dequantized weight: what QLoRAMatmul must equal."""
    xd = x if mask is None else x * mask / (1 - p)
    return F.linear(x, weight_of(base, x.dtype), bias) + F.linear(F.linear(xd, A), B) * scaling


def float64_inputs(seed=1, leading=(2, 3)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*leading, IN, generator=g, dtype=torch.float64, requires_grad=True)
    A = torch.randn(R, IN, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(OUT, R, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(OUT, generator=g, dtype=torch.float64, requires_grad=True)
    return x, A, B, bias


@pytest.mark.parametrize("kind", ["nf4", "int8", "16bit"])
@pytest.mark.parametrize("with_dropout", [False, True])
def test_gradcheck_float64(kind, with_dropout):
    base = make_base(kind)
    x, A, B, bias = float64_inputs()
    mask = dropout_mask(x, P, torch.Generator().manual_seed(2)) if with_dropout else None
    p = P if with_dropout else 0.0

    def f(x, bias, A, B):
        return QLoRAMatmul.apply(x, base, bias, A, B, SCALING, mask, p)

    assert torch.autograd.gradcheck(f, (x, bias, A, B))


def test_gradcheck_base_matmul_alone():
    base = make_base("nf4")
    x, _, _, bias = float64_inputs()
    assert torch.autograd.gradcheck(lambda x, b: qlora_linear(x, base, b), (x, bias))


@pytest.mark.parametrize("kind", ["nf4", "16bit"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_equals_plain_autograd_dense_reference(kind, dtype, tol):
    base = make_base(kind)
    x, A, B, bias = (t.detach().to(dtype).requires_grad_() for t in float64_inputs(seed=3))
    mask = dropout_mask(x, P, torch.Generator().manual_seed(4))
    out = qlora_linear(x, base, bias, A, B, SCALING, mask, P)
    ref = dense_reference(x, base, bias, A, B, SCALING, mask, P)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, bias, A, B), g)
    ref_grads = torch.autograd.grad(ref, (x, bias, A, B), g)
    for name, got, want in zip(("x", "bias", "A", "B"), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=f"d{name} (bound {tol})")


def saved_shapes(fn):
    """Shapes of every tensor autograd saves while ``fn`` runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


@pytest.mark.parametrize("p", [0.0, P])
def test_saved_tensors_never_include_a_dequantized_weight(p):
    torch.manual_seed(5)
    layer = LoRALinear(make_base("nf4"), r=R, lora_dropout=p).train()
    x = torch.randn(7, IN, requires_grad=True)   # 7 tokens != OUT rows: shapes cannot collide
    shapes = saved_shapes(lambda: layer(x))
    assert (OUT, IN) not in shapes and (IN, OUT) not in shapes  # nor its transpose
    expected = {(7, IN), (R, IN), (OUT, R)}      # x (and its mask), A, B
    assert set(shapes) == expected, shapes
    assert shapes.count((7, IN)) == (2 if p else 1)


def test_a_frozen_4bit_layer_alone_saves_nothing():
    base = make_base("nf4")
    x = torch.randn(7, IN, requires_grad=True)
    assert saved_shapes(lambda: base(x)) == []  # dx = G W_hat needs neither x nor W_hat


def test_plain_autograd_would_have_saved_the_weight():
    """The contrast the hand-written backward exists for."""
    base = make_base("nf4")
    x = torch.randn(7, IN, requires_grad=True)
    shapes = saved_shapes(lambda: F.linear(x, base.dequantize(torch.float32)))
    assert (IN, OUT) in shapes  # W^T, kept to compute dx = G W


class CountingBase(torch.nn.Module):
    """A 4-bit base that counts its dequantizations."""

    def __init__(self, base):
        super().__init__()
        self.base, self.calls = base, 0
        self.in_features, self.out_features, self.bias = base.in_features, base.out_features, None

    def dequantize(self, dtype):
        self.calls += 1
        return self.base.dequantize(dtype)


@pytest.mark.parametrize("x_requires_grad,expected_calls", [(True, 2), (False, 1)])
def test_backward_recomputes_the_weight_only_for_the_input_gradient(x_requires_grad,
                                                                    expected_calls):
    base = CountingBase(make_base("nf4"))
    x = torch.randn(4, IN, requires_grad=x_requires_grad)
    A = torch.randn(R, IN, requires_grad=True)
    B = torch.randn(OUT, R, requires_grad=True)
    qlora_linear(x, base, None, A, B, SCALING).sum().backward()
    assert base.calls == expected_calls
    assert A.grad is not None and B.grad is not None


def test_mixed_precision_adapters_get_gradients_in_their_own_dtype():
    base = make_base("nf4")
    x = torch.randn(4, IN, dtype=torch.bfloat16, requires_grad=True)
    A = torch.randn(R, IN, requires_grad=True)           # float32 adapters,
    B = torch.randn(OUT, R, requires_grad=True)          # bfloat16 compute
    out = qlora_linear(x, base, None, A, B, SCALING)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert A.grad.dtype == B.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_only_adapter_parameters_receive_gradients():
    for kind in ("nf4", "int8", "16bit"):
        layer = LoRALinear(make_base(kind), r=R)
        torch.nn.init.normal_(layer.lora_B)  # B = 0 would make dA vanish
        layer(torch.randn(5, IN)).square().sum().backward()
        with_grad = {n for n, p in layer.named_parameters() if p.grad is not None}
        assert with_grad == {"lora_A", "lora_B"}, (kind, with_grad)
        assert all(not p.requires_grad for p in layer.base_layer.parameters())


def test_bad_arguments_raise_value_error():
    base = make_base("nf4")
    x = torch.randn(4, IN)
    with pytest.raises(ValueError, match="both lora_A and lora_B"):
        qlora_linear(x, base, None, torch.randn(R, IN), None)
    with pytest.raises(ValueError, match="mask has shape"):
        qlora_linear(x, base, None, torch.randn(R, IN), torch.randn(OUT, R),
                     mask=torch.ones(3, IN, dtype=torch.bool), dropout_p=0.5)
    with pytest.raises(ValueError, match=r"lora_A \(3, 12\) and lora_B \(3, 3\)"):
        qlora_linear(x, base, None, torch.randn(R, IN), torch.randn(R, R))
    with pytest.raises(ValueError, match=r"Linear4bit\(in_features=12.*shape \(4, 11\)"):
        qlora_linear(torch.randn(4, 11), base)


@pytest.mark.cuda
def test_equals_dense_reference_on_cuda():
    base = make_base("nf4").to("cuda")
    x, A, B, bias = (t.detach().float().cuda().requires_grad_() for t in float64_inputs(seed=6))
    out = qlora_linear(x, base, bias, A, B, SCALING)
    ref = dense_reference(x, base, bias, A, B, SCALING, None, 0.0)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.sum(), (x, A, B))
    ref_grads = torch.autograd.grad(ref.sum(), (x, A, B))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
