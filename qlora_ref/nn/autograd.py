r"""``QLoRAMatmul``: a linear layer over a frozen (4-bit) weight plus LoRA adapters, with a hand-written backward.

Paper section 3, "QLoRA": equation (5) is the layer,
:math:`\mathbf Y = \mathbf X\,\operatorname{doubleDequant}(c_1, c_2, \mathbf W^{\text{NF4}})
+ \mathbf X\mathbf L_1\mathbf L_2`, and equation (6) defines
:math:`\operatorname{doubleDequant}(c_1, c_2, \mathbf W) = \operatorname{dequant}(\operatorname{dequant}(c_1, c_2), \mathbf W)`.
Neither has a scaling or a dropout. The scaling :math:`s` is in the paper's
LoRA equation (3), :math:`\mathbf Y = \mathbf X\mathbf W + s\,\mathbf X\mathbf L_1\mathbf L_2`
(section 2), with :math:`s = \alpha / r` as PEFT computes it; the dropout is
LoRA's, a hyperparameter the paper sets (appendix) and PEFT applies to the
adapter input. With PEFT's names, :math:`\mathbf L_1 = \mathbf A^\top` and
:math:`\mathbf L_2 = \mathbf B^\top`, in the row convention used throughout
(a row of :math:`\mathbf X` is one token), a forward pass computes

.. math::

    \mathbf{Y} = \mathbf{X}\,\hat{\mathbf W}^\top + \mathbf b
        + s\,\big(d(\mathbf X)\,\mathbf A^\top\big)\,\mathbf B^\top,
    \qquad \hat{\mathbf W} = \operatorname{doubleDequant}(c_1, c_2, \mathbf W^{\text{NF4}}),
    \qquad s = \alpha / r,

with :math:`d` the LoRA dropout (see ``docs/notation.md`` for every symbol),
and the backward pass needs
:math:`\partial E / \partial \mathbf X` through :math:`\hat{\mathbf W}` (to reach
earlier layers) but never a gradient for :math:`\mathbf W^{\text{NF4}}`.

The point of writing the backward by hand is memory. Plain autograd through
``F.linear(x, W_hat)`` would keep the dequantized :math:`\hat{\mathbf W}`
(16 bits per weight, 4x the stored weight) alive from forward to backward,
for every layer. Here the forward keeps only what the backward needs -- the
input, the dropout mask (one byte per element, if any), and the adapters --
and the backward dequantizes :math:`\hat{\mathbf W}` again, as bitsandbytes'
``MatMul4Bit`` does.

Mirrors ``bitsandbytes.autograd._functions.MatMul4Bit`` (base path) plus
PEFT's ``lora.Linear.forward`` (adapter path).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["QLoRAMatmul", "qlora_linear", "qlora_inference", "frozen_weight", "dense_weight", "is_conv1d",
           "dropout_mask"]


def is_conv1d(module) -> bool:
    """Whether ``module`` is a ``transformers`` ``Conv1D`` (GPT-2): weight ``(in, out)``, :math:`y = xW + b`.

    Recognised by class name and layout, so transformers is never imported here.
    """
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf")
            and getattr(getattr(module, "weight", None), "dim", lambda: 0)() == 2)


def dense_weight(base) -> torch.Tensor:
    """The ``(out, in)`` weight of a 16-bit base: ``nn.Linear``'s own, a ``Conv1D``'s transposed (a view)."""
    return base.weight.t() if is_conv1d(base) else base.weight  # Conv1D stores (in, out)


def frozen_weight(base, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's ``(out, in)`` weight in ``dtype``, never tracked by autograd.

    A quantized base (:class:`~qlora_ref.nn.Linear4bit`,
    :class:`~qlora_ref.nn.Linear8bit`) dequantizes itself; a 16-bit
    ``nn.Linear`` (or ``Conv1D``) returns its weight (a view when the dtype already matches).
    """
    dequantize = getattr(base, "dequantize", None)
    if dequantize is not None:
        return dequantize(dtype)
    return dense_weight(base).detach().to(dtype)


def dropout_mask(x: torch.Tensor, p: float, generator: torch.Generator | None = None
                 ) -> torch.Tensor | None:
    r"""A boolean keep-mask :math:`m_i \sim \text{Bernoulli}(1 - p)` of ``x``'s shape, or None if ``p == 0``.

    Stored as ``torch.bool``: one byte per element, a quarter of a float32 copy of ``x``.
    """
    if p == 0:
        return None
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p,
                                                                              generator=generator)


def _apply_dropout(x: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    r""":math:`d(\mathbf X) = \mathbf X \odot \mathbf M / (1 - p)` (inverted dropout, as ``nn.Dropout``)."""
    if mask is None:
        return x
    return x * mask / (1 - p)


class QLoRAMatmul(torch.autograd.Function):
    r"""Frozen-base linear layer with LoRA adapters; the base weight is dequantized on the fly.

    Forward, with :math:`\mathbf X` of shape ``(..., in)``, :math:`\mathbf A`
    ``(r, in)``, :math:`\mathbf B` ``(out, r)``:

    .. math::

        \mathbf H = d(\mathbf X)\,\mathbf A^\top, \qquad
        \mathbf Y = \mathbf X\,\hat{\mathbf W}^\top + \mathbf b + s\,\mathbf H\,\mathbf B^\top .

    Backward, with :math:`\mathbf G = \partial E / \partial \mathbf Y` (sums
    run over all leading dimensions):

    .. math::

        \frac{\partial E}{\partial \mathbf X} &= \mathbf G\,\hat{\mathbf W}
            + \big(s\,\mathbf G \mathbf B\,\mathbf A\big) \odot \mathbf M / (1 - p) \\
        \frac{\partial E}{\partial \mathbf A} &= \big(s\,\mathbf G \mathbf B\big)^\top d(\mathbf X) \\
        \frac{\partial E}{\partial \mathbf B} &= s\,\mathbf G^\top \mathbf H \\
        \frac{\partial E}{\partial \mathbf b} &= \textstyle\sum \mathbf G \\
        \frac{\partial E}{\partial \mathbf W^{\text{NF4}}} &= \text{none (frozen)}

    Saved for backward: :math:`\mathbf X` (only for the adapter gradients),
    the mask :math:`\mathbf M` (bool, if dropout is on), :math:`\mathbf A`,
    :math:`\mathbf B` -- never :math:`\hat{\mathbf W}`, which the backward
    dequantizes again, and only when :math:`\partial E/\partial\mathbf X` is
    needed. :math:`\mathbf H` (``r`` numbers per token) is recomputed too. The
    base matmul alone saves nothing at all.

    Parameters
    ----------
    x : torch.Tensor
        ``(..., in)`` in the compute dtype. (All parameters are positional
        arguments of ``QLoRAMatmul.apply``; :func:`qlora_linear` names them.)
    base : module
        Frozen base layer: anything with ``dequantize(dtype)``, or an
        ``nn.Linear`` or ``Conv1D`` (its weight is read, never differentiated;
        a ``Conv1D``'s ``(in, out)`` weight is used transposed, so
        ``F.linear`` computes ``addmm(b, x, W)`` exactly as ``Conv1D`` does).
    bias : torch.Tensor or None
        ``(out,)``; gets a gradient only if it requires one.
    lora_A, lora_B : torch.Tensor or None
        ``(r, in)`` and ``(out, r)``; both None for the base matmul alone.
        Cast to ``x.dtype`` for the computation; gradients come back in their own dtype.
    scaling : float
        :math:`s = \alpha / r`.
    mask : torch.Tensor or None
        Boolean keep-mask of ``x``'s shape (see :func:`dropout_mask`).
    dropout_p : float
        The dropout probability ``p`` the mask was drawn with.
    """

    @staticmethod
    def forward(ctx, x, base, bias, lora_A, lora_B, scaling, mask, dropout_p):
        ctx.base, ctx.scaling, ctx.dropout_p = base, float(scaling), float(dropout_p)
        ctx.has_lora = lora_A is not None
        dequantize = getattr(base, "dequantize", None)        # a quantized base, or nn.Linear
        weight = (dequantize(x.dtype) if dequantize                  # (out, in)
                  else dense_weight(base).detach().to(x.dtype))
        out = F.linear(x, weight, None if bias is None else bias.to(x.dtype))  # (..., out)
        if ctx.has_lora:
            h = F.linear(_apply_dropout(x, mask, dropout_p), lora_A.to(x.dtype))  # (..., r)
            # same order of operations as PEFT: base(x) + B(A(d(x))) * scaling
            out = out + F.linear(h, lora_B.to(x.dtype)) * scaling
        # keep only what backward will read: x for dA and dB, the mask wherever d(.) appears
        need_x, _, _, need_A, need_B = ctx.needs_input_grad[:5]
        keep_x = ctx.has_lora and (need_A or need_B)
        keep_mask = ctx.has_lora and (need_x or keep_x)
        ctx.save_for_backward(x if keep_x else None, mask if keep_mask else None, lora_A, lora_B)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, mask, lora_A, lora_B = ctx.saved_tensors
        need_x, _, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        s, p = ctx.scaling, ctx.dropout_p
        g = grad_out                                                  # (..., out)
        dx = dbias = dA = dB = None
        if need_x:
            dx = g @ frozen_weight(ctx.base, g.dtype)                 # (..., in): G W_hat
        if need_bias:
            dbias = g.reshape(-1, g.shape[-1]).sum(0).to(ctx.bias_dtype)  # (out,)
        if ctx.has_lora:
            A, B = lora_A.to(g.dtype), lora_B.to(g.dtype)
            gb = (g @ B) * s                                          # (..., r): s G B
            if need_x:
                dx = dx + _apply_dropout(gb @ A, mask, p)             # (..., in)
            if need_A or need_B:
                xd = _apply_dropout(x, mask, p).reshape(-1, x.shape[-1])  # (tokens, in)
            if need_A:
                dA = (gb.reshape(-1, gb.shape[-1]).T @ xd).to(lora_A.dtype)   # (r, in)
            if need_B:
                h = xd @ A.T                                          # (tokens, r), recomputed
                dB = ((g.reshape(-1, g.shape[-1]).T @ h) * s).to(lora_B.dtype)  # (out, r)
        return dx, None, dbias, dA, dB, None, None, None


def qlora_inference(x: torch.Tensor, base, bias: torch.Tensor | None, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    r"""The forward of :class:`QLoRAMatmul` when no backward will follow (generation), without dropout.

    :math:`\mathbf Y = \mathbf X\hat{\mathbf W}^\top + \mathbf b + s\,(\mathbf X\mathbf A^\top)\mathbf B^\top`.
    With nothing to save for a backward, a base that can multiply a few rows
    straight from its codes does so (:meth:`~qlora_ref.nn.Linear4bit.matmul_few_rows`,
    which never forms :math:`\hat{\mathbf W}`); otherwise this is :class:`QLoRAMatmul`'s forward.
    """
    fused = getattr(base, "matmul_few_rows", None)
    out = fused(x, bias) if fused is not None else None                    # (..., out) or None
    if out is None:
        return QLoRAMatmul.apply(x, base, bias, lora_A, lora_B, scaling, None, 0.0)
    h = F.linear(x, lora_A.to(x.dtype))                                     # (..., r)
    return out + F.linear(h, lora_B.to(x.dtype)) * scaling                  # as QLoRAMatmul


def qlora_linear(x: torch.Tensor, base, bias: torch.Tensor | None = None,
                 lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None,
                 scaling: float = 1.0, mask: torch.Tensor | None = None,
                 dropout_p: float = 0.0) -> torch.Tensor:
    r"""Functional form of :class:`QLoRAMatmul`: :math:`\mathbf X\hat{\mathbf W}^\top + \mathbf b + s\,d(\mathbf X)\mathbf A^\top\mathbf B^\top`.

    With ``lora_A = lora_B = None`` it is the frozen base layer alone (how
    :class:`~qlora_ref.nn.Linear4bit` computes its forward).
    """
    label = base.label() if hasattr(base, "label") else type(base).__name__
    out_features, in_features = base.out_features, base.in_features
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{label}: input has shape {tuple(x.shape)}, expected "
                         f"(..., {in_features})")
    if (lora_A is None) != (lora_B is None):
        raise ValueError(f"{label}: pass both lora_A and lora_B, or neither")
    if lora_A is not None:
        r = lora_A.shape[0]
        if tuple(lora_A.shape) != (r, in_features) or tuple(lora_B.shape) != (out_features, r):
            raise ValueError(f"{label}: lora_A {tuple(lora_A.shape)} and lora_B "
                             f"{tuple(lora_B.shape)} must be (r, {in_features}) and "
                             f"({out_features}, r)")
    if mask is not None and mask.shape != x.shape:
        raise ValueError(f"{label}: dropout mask has shape {tuple(mask.shape)}, input "
                         f"{tuple(x.shape)}")
    return QLoRAMatmul.apply(x, base, bias, lora_A, lora_B, scaling, mask, dropout_p)
