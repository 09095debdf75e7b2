r"""``LoRALinear``: low-rank adapters over a frozen base layer (16-, 8- or 4-bit).

LoRA (Hu et al. 2021), as QLoRA uses it (paper section 2, "Low-rank
Adapters", equation (3): :math:`\mathbf Y = \mathbf X\mathbf W + s\,\mathbf X\mathbf L_1\mathbf L_2`,
here in the row convention with :math:`\mathbf L_1 = \mathbf A^\top`,
:math:`\mathbf L_2 = \mathbf B^\top`; equation (5) in section 3 puts the same
adapters over the 4-bit base): the base weight :math:`\mathbf W`
is frozen and a trainable low-rank update is added,

.. math::

    \mathbf Y = \mathbf X \mathbf W^\top + s\,\mathbf X \mathbf A^\top \mathbf B^\top
              = \mathbf X\,(\mathbf W + \Delta\mathbf W)^\top, \qquad
    \Delta\mathbf W = s\,\mathbf B \mathbf A, \qquad s = \frac{\alpha}{r},

with :math:`\mathbf A \in \mathbb R^{r \times \text{in}}`,
:math:`\mathbf B \in \mathbb R^{\text{out} \times r}`.

One formula: :func:`lora_scaling` is the only place :math:`s` is computed
(PEFT's rule, :math:`\alpha / r`) and :func:`delta_weight` the only place
:math:`\Delta\mathbf W` is formed; ``merge`` and ``unmerge`` use it, and the
forward applies the same factors to the input
(:math:`s\,(\mathbf X\mathbf A^\top)\mathbf B^\top`, never forming the
``(out, in)`` product) through :class:`~qlora_ref.nn.QLoRAMatmul`. A test
checks forward against :math:`\mathbf X(\mathbf W + \Delta\mathbf W)^\top`.

Mirrors PEFT's ``lora.Linear`` / ``lora.Linear4bit`` (``get_delta_weight``,
``merge``, ``unmerge``, ``init_lora_weights``) without the adapter-name
bookkeeping: one adapter per layer.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .autograd import QLoRAMatmul, qlora_inference, dense_weight, dropout_mask, frozen_weight, is_conv1d
from .linear4bit import Linear4bit, lean_kernel
from .linear8bit import Linear8bit
from .quantized import QuantizedLinear, check_linear_input
from ..backend import default_num_threads
from ..validation import INITS, QUANT_BITS, check_lora_alpha, check_lora_rank

__all__ = ["lora_scaling", "delta_weight", "low_rank_factors",
           "freeze_base", "LoRALinear"]

def lora_scaling(lora_alpha: float, r: int) -> float:
    r"""The LoRA scaling :math:`s = \alpha / r` (PEFT's rule; no rsLoRA)."""
    return lora_alpha / r


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    r"""The low-rank update :math:`\Delta\mathbf W = s\,\mathbf B\mathbf A`, shape ``(out, in)``.

    Computed as ``(B @ A) * scaling``, PEFT's order of operations, in the adapters' dtype.
    """
    return (lora_B @ lora_A) * scaling  # (out, r) @ (r, in) -> (out, in)


def low_rank_factors(residual: torch.Tensor, r: int, scaling: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Adapters whose update is the best rank-``r`` approximation of ``residual`` (LoftQ).

    .. math::

        \mathbf R = \mathbf U \boldsymbol\Sigma \mathbf V^\top, \qquad
        \mathbf A = \boldsymbol\Sigma_r^{1/2} \mathbf V_r^\top, \qquad
        \mathbf B = \mathbf U_r \boldsymbol\Sigma_r^{1/2} / s,

    so that :math:`s\,\mathbf B\mathbf A = \mathbf U_r\boldsymbol\Sigma_r\mathbf V_r^\top`
    (Eckart-Young). Li et al. (2023), "LoftQ", with one alternation.
    Note: PEFT's ``loftq_init`` leaves out the ``1/s``; we keep it so that the
    layer's output starts at exactly the rank-``r`` correction, whatever ``alpha``.

    Returns
    -------
    lora_A : torch.Tensor
        ``(r, in)``, float32.
    lora_B : torch.Tensor
        ``(out, r)``, float32.
    """
    U, S, Vh = torch.linalg.svd(residual.float(), full_matrices=False)  # (out,k) (k,) (k,in)
    root = S[:r].sqrt()                                                  # (r,)
    return root[:, None] * Vh[:r], U[:, :r] * root / scaling


def freeze_base(linear: nn.Module, quant_bits: int = 4, compute_dtype=None,
                **quant_config) -> nn.Module:
    """The frozen base layer for ``linear`` at ``quant_bits`` of storage.

    Parameters
    ----------
    linear : nn.Linear, transformers' Conv1D, or bitsandbytes' Linear4bit
    quant_bits : {4, 8, 16}
        4: :class:`~qlora_ref.nn.Linear4bit` (``quant_type``, ``blocksize``,
        ``double_quant``); 8: :class:`~qlora_ref.nn.Linear8bit` (``blocksize``);
        16: the layer itself, frozen, in its own dtype (a ``Conv1D`` stays a
        ``Conv1D``: its ``(in, out)`` weight is used transposed).
        A layer bitsandbytes already quantized to 4 bits is imported, bytes
        unchanged (:meth:`~qlora_ref.nn.Linear4bit.from_bitsandbytes_layer`);
        its format must equal the one asked for.
    compute_dtype : torch.dtype, optional
        For the quantized bases.
    """
    if quant_bits not in QUANT_BITS:
        raise ValueError(f"quant_bits must be one of {QUANT_BITS}, got {quant_bits!r}")
    if Linear4bit.is_bitsandbytes_layer(linear):
        return Linear4bit.from_bitsandbytes_layer(linear, compute_dtype=compute_dtype,
                                                  quant_bits=quant_bits, **quant_config)
    if not (isinstance(linear, nn.Linear) or is_conv1d(linear)):
        raise ValueError(f"freeze_base expects an nn.Linear or Conv1D, got {type(linear).__name__}")
    if not linear.weight.is_floating_point():
        raise ValueError(f"freeze_base: {type(linear).__name__} holds a {linear.weight.dtype} "
                         "weight, not a floating-point one; only nn.Linear, Conv1D and "
                         "bitsandbytes' Linear4bit layers can be a base")
    if quant_bits == 16:
        return linear.requires_grad_(False)
    cls = Linear4bit if quant_bits == 4 else Linear8bit
    return cls.from_linear(linear, compute_dtype=compute_dtype, **quant_config)


class LoRALinear(nn.Module):
    r"""A frozen base layer plus trainable adapters: :math:`\mathbf Y = \text{base}(\mathbf X) + s\,d(\mathbf X)\mathbf A^\top\mathbf B^\top`.

    Parameters
    ----------
    base_layer : nn.Linear, Conv1D, Linear4bit or Linear8bit
        The frozen base (an ``nn.Linear`` or ``Conv1D`` is frozen in place: 16-bit LoRA).
    r : int
        Rank of the update, > 0.
    lora_alpha : float
        :math:`\alpha`; the update is scaled by :math:`s = \alpha / r`.
    lora_dropout : float
        Dropout probability on the adapter input, in [0, 1).
    init : {"lora", "gaussian", "loftq"}
        ``"lora"``: A ~ kaiming_uniform(a=sqrt(5)) (PEFT's default, as
        ``nn.Linear``), B = 0; ``"gaussian"``: A ~ N(0, 1/r^2), B = 0 (PEFT's
        ``init_lora_weights="gaussian"``) -- both start the model unchanged;
        ``"loftq"``: A, B from the SVD of the quantization residual
        :math:`\mathbf W - \operatorname{dequant}(Q(\mathbf W))` (see
        :func:`low_rank_factors`); needs ``weight``.
    weight : torch.Tensor, optional
        The 16-bit ``(out, in)`` weight the base was quantized from (``init="loftq"`` only).
    fan_in_fan_out : bool, optional
        Whether the layer replaces a ``transformers`` ``Conv1D`` (GPT-2), PEFT's
        ``LoraConfig.fan_in_fan_out``. Default: whether ``base_layer`` is one.
        Only the 16-bit base keeps the ``(in, out)`` storage; a quantized base
        is ``(out, in)`` either way, and ``lora_A``, ``lora_B`` always have
        PEFT's shapes ``(r, in)``, ``(out, r)``.

    Attributes
    ----------
    lora_A : nn.Parameter
        ``(r, in_features)``, float32.
    lora_B : nn.Parameter
        ``(out_features, r)``, float32.
    scaling : float
    merged : bool
    fan_in_fan_out : bool
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, lora_alpha: float = 16,
                 lora_dropout: float = 0.0, init: str = "lora", weight: torch.Tensor | None = None,
                 fan_in_fan_out: bool | None = None):
        super().__init__()
        conv1d = is_conv1d(base_layer)
        if not isinstance(base_layer, (nn.Linear, QuantizedLinear)) and not conv1d:
            raise ValueError(f"LoRALinear wraps an nn.Linear, Conv1D, Linear4bit or Linear8bit, "
                             f"got {type(base_layer).__name__}")
        self.fan_in_fan_out = conv1d if fan_in_fan_out is None else bool(fan_in_fan_out)
        if conv1d:  # transformers' Conv1D: weight (in, out), nf = out
            self.in_features, self.out_features = base_layer.weight.shape[0], base_layer.nf
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.name = getattr(base_layer, "name", "")
        try:
            check_lora_rank(r)
            check_lora_alpha(lora_alpha)
        except ValueError as exc:
            raise ValueError(f"{self._shape()}: {exc}") from None
        if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real) \
                or not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"{self._shape()}: lora_dropout must be in [0, 1), "
                             f"got {lora_dropout!r}")
        self.base_layer = base_layer.requires_grad_(False)
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, float(lora_dropout)
        self.scaling = lora_scaling(lora_alpha, r)
        device = (base_layer.device if isinstance(base_layer, QuantizedLinear)
                  else base_layer.weight.device)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))   # (r, in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device))  # (out, r)
        self.merged = False
        self.register_buffer("merged_weight", None, persistent=False)
        self.reset_lora_parameters(init, weight)

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 16,
                    lora_dropout: float = 0.0, init: str = "lora", quant_bits: int = 4,
                    compute_dtype=None, loftq_iters: int = 1, **quant_config) -> "LoRALinear":
        r"""Freeze (and quantize) ``linear`` with :func:`freeze_base`, then add adapters.

        With ``init="loftq"`` and ``loftq_iters = T > 1``, LoftQ alternates
        :math:`Q_t = Q(\mathbf W - s\mathbf B_{t-1}\mathbf A_{t-1})` and
        :math:`(\mathbf A_t, \mathbf B_t) = \operatorname{SVD}_r(\mathbf W - \operatorname{dequant}(Q_t))`.
        """
        weight = (dense_weight(linear).detach().clone()  # (out, in) W, for LoftQ only
                  if init == "loftq" else None)
        base = freeze_base(linear, quant_bits, compute_dtype, **quant_config)
        layer = cls(base, r, lora_alpha, lora_dropout, init=init, weight=weight,
                    fan_in_fan_out=is_conv1d(linear))
        for _ in range(1, loftq_iters if init == "loftq" else 1):
            target = weight.float() - layer.delta_weight(torch.float32)
            layer.base_layer = base.requantize(target.to(weight.dtype)).requires_grad_(False)
            layer.reset_lora_parameters("loftq", weight)
        return layer

    def reset_lora_parameters(self, init: str = "lora", weight: torch.Tensor | None = None):
        """(Re)initialise ``lora_A`` and ``lora_B``; see the class docstring for ``init``."""
        if init not in INITS:
            raise ValueError(f"{self.label()}: init must be one of {INITS}, got {init!r}")
        with torch.no_grad():
            if init == "loftq":
                A, B = low_rank_factors(self._quantization_residual(weight), self.r, self.scaling)
                self.lora_A.copy_(A)
                self.lora_B.copy_(B)
                return
            if init == "lora":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT
            else:
                nn.init.normal_(self.lora_A, std=1 / self.r)
            nn.init.zeros_(self.lora_B)  # B = 0: the model starts unchanged

    def _quantization_residual(self, weight):
        if not isinstance(self.base_layer, QuantizedLinear):
            raise ValueError(f"{self.label()}: init='loftq' needs a quantized base "
                             "(there is no quantization error to cancel in a 16-bit base)")
        if weight is None or tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{self.label()}: init='loftq' needs the original weight of shape "
                             f"({self.out_features}, {self.in_features}), got "
                             f"{None if weight is None else tuple(weight.shape)}")
        if self.r > min(self.in_features, self.out_features):
            raise ValueError(f"{self.label()}: init='loftq' needs r <= min(in, out) = "
                             f"{min(self.in_features, self.out_features)}, got r={self.r}")
        return weight.float() - self.base_layer.dequantize(torch.float32)  # W - dequant(Q(W))

    # -- the one formula ------------------------------------------------------------
    def delta_weight(self, dtype=None) -> torch.Tensor:
        r""":math:`\Delta\mathbf W = s\,\mathbf B\mathbf A`, ``(out, in)``, in ``dtype`` (default the adapters')."""
        delta = delta_weight(self.lora_A, self.lora_B, self.scaling)
        return delta if dtype is None else delta.to(dtype)

    # -- forward ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.merged:
            return self._merged_forward(x)
        compute_dtype = getattr(self.base_layer, "compute_dtype", None) or x.dtype
        xc = x.to(compute_dtype)
        p = self.lora_dropout if self.training else 0.0
        if p == 0 and not torch.is_grad_enabled():  # generation: no backward to prepare for
            out = self._decode(xc)
            if out is not None:
                return out.to(x.dtype)
            return qlora_inference(xc, self.base_layer, self.base_layer.bias, self.lora_A,
                                   self.lora_B, self.scaling).to(x.dtype)
        # shapes are the layer's own (checked when it was built): straight to the function
        out = QLoRAMatmul.apply(xc, self.base_layer, self.base_layer.bias, self.lora_A,
                                self.lora_B, self.scaling, dropout_mask(xc, p), p)
        return out.to(x.dtype)

    def _decode(self, xc: torch.Tensor) -> torch.Tensor | None:
        r"""The lean decoding path: :math:`\mathbf Y = \mathbf X\hat{\mathbf W}^\top + \mathbf b + s\,(\mathbf X\mathbf A^\top)\mathbf B^\top` in float32, rounded once.

        Taken by :meth:`forward` without a gradient or dropout, for a 4-bit
        base whose fused kernel applies (:meth:`~qlora_ref.nn.Linear4bit.fused_plan`,
        checked once per change of the buffers) and at most
        :data:`~qlora_ref.nn.Linear4bit.FUSED_MAX_ROWS` rows of ``xc`` (the
        input in the compute dtype); None otherwise, and the readable twin
        :func:`~qlora_ref.nn.qlora_inference` runs.

        Note (one rounding): the twin rounds the base output, the adapters
        and each product to the compute dtype; here everything after the
        input is float32 (the adapters are float32 parameters), added in
        place and rounded to ``xc.dtype`` once. With a float32 compute dtype
        the two differ only in the order of float32 sums; in bfloat16 this
        path is the more accurate one (``tests/nn/test_fast_decode.py`` checks both bounds).
        Per call it is one kernel call (:meth:`_decode_kernel`: the 4-bit
        product, the adapters and the bias) and two small torch calls, where
        the twin's checks, dispatch and bfloat16 adapter casts cost about as
        much as the kernel again on SmolLM2's layers.
        """
        base = self.base_layer
        plan_of = getattr(base, "fused_plan", None)
        rows = xc.numel() // self.in_features
        if (plan_of is None or not 1 <= rows <= base.FUSED_MAX_ROWS
                or xc.dtype == torch.float64 or xc.device.type != "cpu"):
            return None
        plan = plan_of()
        if plan is None:
            return None
        x32 = xc.reshape(rows, self.in_features)                                  # (rows, in)
        if x32.dtype != torch.float32 or not x32.is_contiguous():
            x32 = x32.to(torch.float32).contiguous()
        y = torch.empty(rows, self.out_features)                                  # (rows, out)
        self._decode_kernel(plan).run(x32.numpy(), y.numpy(), False,  # x W^T + s (x A^T) B^T + b
                                      default_num_threads(base.weight_numel))  # as fused_matmul
        y = y.view(*xc.shape[:-1], self.out_features)
        return y if xc.dtype == torch.float32 else y.to(xc.dtype)

    def _decode_kernel(self, plan):
        """The one kernel call of :meth:`_decode` (``LeanProjection``): the plan's codes and float32 copies of ``A^T``, ``B^T`` and the bias.

        Its twin is the torch sequence it replaced, ``y = fused_matmul(x, plan);
        y.addmm_(x @ A^T, B^T, alpha=s); y += b``: the same kernel bytes for the
        base, the same float32 operations after it in another summation order
        (``tests/nn/test_fast_decode.py``).

        Note (small layers): on the tiny GPT's 128 x 128 layers a decoding call
        is a few microseconds, and casting the adapters, looking up the
        parameters and each small torch call cost as much as the kernel. The
        kernel object is made once and kept while the plan, the adapters and
        the bias are the same tensors at the same address and version (an
        optimizer step or ``copy_`` bumps the version, ``.to()`` moves the
        data) and the scaling is unchanged.
        """
        a, b = self._parameters["lora_A"], self._parameters["lora_B"]
        bias = self.base_layer.bias
        key = (a._version, b._version, a.data_ptr(), b.data_ptr(), self.scaling,
               None if bias is None else (bias._version, bias.data_ptr()))
        held = self.__dict__.get("_decode_held")
        if (held is None or held[0] is not plan or held[1] is not a or held[2] is not b
                or held[3] is not bias or held[4] != key):
            with torch.no_grad():
                a_t = a.detach().to(torch.float32).t().contiguous()               # (in, r)
                b_t = b.detach().to(torch.float32).t().contiguous()               # (r, out)
                lean = lean_kernel(
                    plan, self.in_features, self.out_features, False, a_t,
                    [(0, self.out_features, 0, a_t.shape[1], b_t, self.scaling)],
                    None if bias is None else bias.detach().to(torch.float32),
                    max_rows=self.base_layer.FUSED_MAX_ROWS)
            held = (plan, a, b, bias, key, lean)
            self.__dict__["_decode_held"] = held  # a plain attribute, not in the state dict
        return held[5]

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_decode_held", None)  # copies and pickles leave the kernel behind (views)
        return state

    def _merged_forward(self, x):
        if self.merged_weight is None:  # 16-bit base: merged in place
            return self.base_layer(x)
        bias = self.base_layer.bias
        return F.linear(x, self.merged_weight.to(x.dtype),
                        None if bias is None else bias.to(x.dtype))

    # -- merge / unmerge ------------------------------------------------------------------
    def merge(self) -> None:
        r"""Fold the adapters into the weight: :math:`\mathbf W' = \hat{\mathbf W} + \Delta\mathbf W`.

        * 16-bit base: in place, ``W += delta`` (PEFT's merge; a ``Conv1D``'s
          ``(in, out)`` weight gets :math:`\Delta\mathbf W^\top`).
        * quantized base: into the *dequantized* weight, held in ``weight_dtype``
          as the ``merged_weight`` buffer; the stored codes are untouched, so
          :meth:`unmerge` is exact. (This is what the adapters were trained
          against; see :mod:`qlora_ref.nn.merge` for the alternatives and their errors.)
        """
        if self.merged:
            warnings.warn(f"{self.label()} is already merged; nothing done", stacklevel=2)
            return
        with torch.no_grad():
            if isinstance(self.base_layer, QuantizedLinear):
                merged = (frozen_weight(self.base_layer, torch.float32)
                          + self.delta_weight(torch.float32))          # dequant(W4) + s B A
                self.merged_weight = merged.to(self.base_layer.weight_dtype)
            else:
                w = dense_weight(self.base_layer)  # (out, in), a view of the stored weight
                w += self.delta_weight(torch.float32).to(w.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge`. Exact for a quantized base; for a 16-bit base ``W -= delta``
        restores W up to one rounding per element (as in PEFT)."""
        if not self.merged:
            warnings.warn(f"{self.label()} is not merged; nothing done", stacklevel=2)
            return
        with torch.no_grad():
            if self.merged_weight is not None:
                self.merged_weight = None
            else:
                w = dense_weight(self.base_layer)  # (out, in), a view of the stored weight
                w -= self.delta_weight(torch.float32).to(w.dtype)
        self.merged = False

    # -- checks and display -----------------------------------------------------------
    def _shape(self) -> str:
        return f"LoRALinear(in_features={self.in_features}, out_features={self.out_features})"

    def label(self) -> str:
        """How error messages name this layer: its module path if known, and its shape."""
        return f"'{self.name}' {self._shape()}" if self.name else self._shape()

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the layer if ``x`` is not ``(..., in_features)`` floating point."""
        check_linear_input(self, x)

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
                f"lora_dropout={self.lora_dropout}, merged={self.merged}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else ""))
