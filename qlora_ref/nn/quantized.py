r"""``QuantizedLinear``: what every frozen, compressed base layer has in common.

Paper section 3, "QLoRA": the base weights are a *storage* format, and each
layer turns them back into a *computation* dtype when it needs them. So a
base layer is defined by one method, ``dequantize(dtype)``, and everything
else follows from it:

.. math::

    \mathbf Y = \mathbf X\, \operatorname{dequantize}(\mathbf W^{\text{stored}})^\top + \mathbf b

The forward goes through :class:`~qlora_ref.nn.QLoRAMatmul` (with no
adapters), so not even the plain layer keeps a dequantized weight between
forward and backward. :class:`~qlora_ref.nn.Linear4bit` (NF4/FP4/INT4, the
paper's base) and :class:`~qlora_ref.nn.Linear8bit` (blockwise 8-bit with the
dynamic code) are the two subclasses; a 16-bit base is a plain, frozen
``nn.Linear``.

Mirrors the parts of ``bitsandbytes.nn.Linear4bit`` / ``Linear8bitLt`` that a
frozen base needs (no training of the quantized weight).

Note (state dict): a base layer saves tensors only, in bitsandbytes'
serialized layout -- ``weight`` (the codes, uint8), ``weight.<constant>``
entries and a ``weight.quant_state.<owner>__<format>`` uint8 tensor holding
JSON metadata -- plus ``bias``. So ``save_pretrained``, safetensors and
``transformers.Trainer`` checkpoints store it, and a 4-bit NF4/FP4 layer's
entries are exactly those of a ``bitsandbytes.nn.Linear4bit``. Loading
reports missing and unexpected keys as ``nn.Module`` does (``strict``), and a
state of another format is a ``ValueError`` naming the layer.

Note (dtype casts): ``model.to(torch.bfloat16)`` converts every floating
buffer of a module. The quantization constants (absmax, code tables, offset)
must stay float32 or the stored weight changes, so ``_apply`` moves them to
the new device but keeps their dtype. The frozen bias follows the cast.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .autograd import dense_weight, is_conv1d, qlora_linear

__all__ = ["QuantizedLinear", "as_torch_dtype"]


def as_torch_dtype(dtype) -> torch.dtype:
    """``"bfloat16"``, ``torch.bfloat16`` or a NumPy dtype name as a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"not a floating-point dtype: {dtype!r}")
    return value


def check_linear_input(layer, x) -> None:
    """Raise ``ValueError`` naming ``layer`` if ``x`` is not a ``(..., in_features)`` float tensor."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{layer.label()}: input must be a floating-point tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or x.shape[-1] != layer.in_features:
        raise ValueError(f"{layer.label()}: input has shape {tuple(x.shape)}, expected "
                         f"(..., {layer.in_features})")


class QuantizedLinear(nn.Module):
    """A frozen linear layer stored compressed and dequantized on the fly.

    Subclasses define ``bits``, :meth:`dequantize`, :meth:`from_weight`,
    :meth:`quant_config`, :attr:`nbytes` and the state-dict layout
    (:meth:`weight_state_dict`, :meth:`weight_state_dict_keys`,
    :meth:`load_weight_state_dict`).

    Parameters
    ----------
    in_features, out_features : int
        Shape of the weight is ``(out_features, in_features)``.
    bias : bool
        Whether the layer has a (frozen) bias.
    compute_dtype : torch.dtype, optional
        Inputs are cast to it for the matmul and the output cast back (as
        bitsandbytes does). None: compute in the input's dtype.
    weight_dtype : torch.dtype or str
        dtype of the weight before quantization (what :meth:`dequantize`
        returns by default and what a merge writes).
    """

    bits: int = 0

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype=None, weight_dtype=torch.float32, device=None):
        super().__init__()
        for what, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{type(self).__name__}: {what} must be a positive int, "
                                 f"got {value!r}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = None if compute_dtype is None else as_torch_dtype(compute_dtype)
        self.weight_dtype = as_torch_dtype(weight_dtype)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=self.weight_dtype,
                                              device=device), requires_grad=False)
                     if bias else None)
        self.name = ""  # module path, set by prepare_model, used in error messages

    # -- what a subclass provides ------------------------------------------------
    def dequantize(self, dtype=None) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight in ``dtype`` (default ``weight_dtype``)."""
        raise NotImplementedError

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    compute_dtype=None, **config) -> "QuantizedLinear":
        """Quantize a float ``(out, in)`` weight into a new layer."""
        raise NotImplementedError

    def quant_config(self) -> dict:
        """The keyword arguments of :meth:`from_weight` that reproduce this layer's format."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight: codes plus quantization constants (code tables excluded)."""
        raise NotImplementedError

    def weight_state_dict(self, key: str = "weight") -> dict:
        """The stored weight as state-dict tensors: ``key`` (the codes) and ``key.<...>`` entries."""
        raise NotImplementedError

    @staticmethod
    def weight_state_dict_keys(state_dict, key: str = "weight") -> list:
        """The keys of ``state_dict`` that :meth:`weight_state_dict` would write under ``key``."""
        raise NotImplementedError

    def load_weight_state_dict(self, entries: dict, key: str = "weight") -> None:
        """Copy the stored weight from :meth:`weight_state_dict`-style ``entries`` (same format)."""
        raise NotImplementedError

    # -- shared behaviour --------------------------------------------------------
    @property
    def weight_numel(self) -> int:
        """Number of weights stored, ``out_features * in_features``."""
        return self.in_features * self.out_features

    @property
    def device(self) -> torch.device:
        """Where the stored weight is."""
        return next(b for b in self.buffers() if b is not None).device

    @classmethod
    def from_linear(cls, linear: nn.Module, compute_dtype=None, **config) -> "QuantizedLinear":
        r"""Quantize an ``nn.Linear`` or ``Conv1D`` (weight and bias are copied; the original is untouched).

        A ``Conv1D`` (GPT-2) stores :math:`\mathbf W^\top`, ``(in, out)``; the
        ``(out, in)`` weight :math:`\mathbf W` is what gets quantized, as
        bitsandbytes does when transformers loads GPT-2 in 4 bits.
        """
        if not (isinstance(linear, nn.Linear) or is_conv1d(linear)):
            raise ValueError(f"{cls.__name__}.from_linear expects an nn.Linear or Conv1D, "
                             f"got {type(linear).__name__}")
        if not linear.weight.is_floating_point():
            raise ValueError(f"{cls.__name__}.from_linear: {type(linear).__name__} holds a "
                             f"{linear.weight.dtype} weight, not a floating-point one (already "
                             "quantized by another library?)")
        return cls.from_weight(dense_weight(linear).detach(), linear.bias,
                               compute_dtype=compute_dtype, **config)

    def _copy_bias(self, bias: torch.Tensor | None) -> None:
        """Set the frozen bias from ``bias`` (shape ``(out_features,)``), or check there is none."""
        if (bias is None) != (self.bias is None):
            raise ValueError(f"{self.label()}: a bias was {'not ' if bias is None else ''}given, "
                             f"but the layer has bias={self.bias is not None}")
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"{self.label()}: bias has shape {tuple(bias.shape)}, expected "
                                 f"({self.out_features},)")
            self.bias.data = bias.detach().clone()

    def requantize(self, weight: torch.Tensor) -> "QuantizedLinear":
        """A new layer of the same format (and bias) holding ``weight`` quantized."""
        return self.from_weight(weight, self.bias, compute_dtype=self.compute_dtype,
                                **self.quant_config())

    def label(self) -> str:
        """How error messages name this layer: its module path if known, and its shape."""
        shape = f"{type(self).__name__}(in_features={self.in_features}, " \
                f"out_features={self.out_features})"
        return f"'{self.name}' {shape}" if self.name else shape

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the layer if ``x`` is not ``(..., in_features)`` floating point."""
        check_linear_input(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x_c = x if self.compute_dtype is None else x.to(self.compute_dtype)
        return qlora_linear(x_c, self, self.bias).to(x.dtype)

    # -- the state dict: tensors only (see the module note) -----------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        entries = self.weight_state_dict(prefix + "weight")
        destination[prefix + "weight"] = entries.pop(prefix + "weight")  # bitsandbytes' order
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination.update(entries)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key, bias_key = prefix + "weight", prefix + "bias"
        mine = self.weight_state_dict_keys(state_dict, key)
        if key in state_dict:
            self.load_weight_state_dict({k: state_dict[k] for k in mine}, key)
        else:
            missing_keys.append(key)
        if self.bias is not None and bias_key in state_dict:
            bias = state_dict[bias_key]
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,):
                error_msgs.append(f"{self.label()}: {bias_key} has shape "
                                  f"{tuple(getattr(bias, 'shape', ()))}, expected "
                                  f"({self.out_features},)")
            else:
                with torch.no_grad():
                    self.bias.copy_(bias)
        elif self.bias is not None:
            missing_keys.append(bias_key)
        if strict:
            known = set(mine) | ({bias_key} if self.bias is not None else set())
            unexpected_keys.extend(k for k in state_dict
                                   if k.startswith(prefix) and k not in known)

    def _apply(self, fn, recurse=True):
        # see the module note (dtype casts): constants keep their dtype, follow the device
        # (a 4-bit layer prepared for FSDP2 holds its constants as frozen parameters)
        # (detach: a parameter is converted in place, ``param.data = ...``; this keeps the old data)
        constants = {(registry, name): t.detach() for registry in ("_buffers", "_parameters")
                     for name, t in getattr(self, registry).items()
                     if t is not None and t.is_floating_point() and name != "bias"}
        super()._apply(fn, recurse)
        for (registry, name), before in constants.items():
            after = getattr(self, registry)[name]
            if after.dtype != before.dtype:
                kept = before.to(after.device)
                getattr(self, registry)[name] = (kept if registry == "_buffers" else
                                                 nn.Parameter(kept, requires_grad=False))
        return self

    def extra_repr(self) -> str:
        config = ", ".join(f"{k}={v!r}" for k, v in self.quant_config().items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {config}, compute_dtype={self.compute_dtype}")
