r"""``Linear8bit``: a frozen linear layer stored as blockwise 8-bit codes (the dynamic code).

Not the paper's base -- QLoRA stores NF4 -- but the natural point between
4 and 16 bits for comparing base precisions (a training config can choose
``quant_bits`` 4, 8 or 16). Paper section 2, "Block-wise k-bit Quantization",
with :math:`k = 8` and the dynamic (signed, exponent-coded) code of Dettmers
et al. (2022), one float32 absmax per block:

.. math::

    c_b = \max_{i \in b}|w_i|, \qquad
    q_i = \operatorname*{arg\,min}_j |\text{code}_j - w_i / c_b|, \qquad
    \hat w_i = \text{code}[q_i]\; c_b .

Mirrors ``bitsandbytes.functional.quantize_blockwise`` /
``dequantize_blockwise`` (8 bits per weight plus 32 / blocksize for the
constants: 8.125 bits at blocksize 256).

State dict (tensors only, in the layout of a 4-bit layer; bitsandbytes has no
such layer -- its ``Linear8bitLt`` is LLM.int8(), row-wise -- so the metadata
is under our name)::

    weight                                    uint8 (out, in)   codes
    bias
    weight.absmax                             float32 (n_blocks,)
    weight.quant_map                          float32 (256,)    the dynamic code
    weight.quant_state.qlora_ref__blockwise8  JSON: shape, blocksize, dtype
"""
from __future__ import annotations

import json

import numpy as np
import torch

from ..blockwise import quantize_blockwise
from ..codebooks import dynamic_code
from ..validation import check_blocksize
from .functional import dequantize_blockwise_torch
from .quantized import QuantizedLinear, as_torch_dtype

__all__ = ["Linear8bit"]

_META = "quant_state.qlora_ref__blockwise8"  # the metadata entry, after "weight."


class Linear8bit(QuantizedLinear):
    """Frozen linear layer with blockwise 8-bit weights (dynamic code, float32 absmax per block).

    Buffers: ``codes`` uint8 ``(out, in)``, ``absmax`` float32 ``(n_blocks,)``,
    ``code`` float32 ``(256,)``.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool
    blocksize : int
        Weights per absmax constant (default 256).
    compute_dtype, weight_dtype
        See :class:`~qlora_ref.nn.QuantizedLinear`.

    Examples
    --------
    >>> import torch
    >>> layer = Linear8bit.from_linear(torch.nn.Linear(128, 64))
    >>> layer.nbytes  # 8192 codes + 32 float32 constants
    8320
    """

    bits = 8

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 blocksize: int = 256, compute_dtype=None, weight_dtype=torch.float32,
                 device=None):
        super().__init__(in_features, out_features, bias, compute_dtype, weight_dtype, device)
        self.blocksize = check_blocksize(blocksize)
        n_blocks = -(-self.weight_numel // self.blocksize)
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8,
                                                  device=device))
        self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.float32, device=device))
        self.register_buffer("code", torch.tensor(dynamic_code(), device=device))

    @classmethod
    def from_linear(cls, linear, blocksize: int = 256, compute_dtype=None) -> "Linear8bit":
        """Quantize an ``nn.Linear`` (the original is untouched; its bias is copied)."""
        return super().from_linear(linear, compute_dtype=compute_dtype, blocksize=blocksize)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    compute_dtype=None, blocksize: int = 256) -> "Linear8bit":
        """Quantize a float ``(out, in)`` weight with :func:`qlora_ref.quantize_blockwise`."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"Linear8bit.from_weight expects a 2-D weight tensor, got "
                             f"{getattr(weight, 'shape', type(weight).__name__)}")
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=bias is not None, blocksize=blocksize,
                    compute_dtype=compute_dtype, weight_dtype=weight.dtype, device=weight.device)
        w = weight.detach().to("cpu", torch.float32).numpy()
        codes, absmax = quantize_blockwise(w, layer.code.cpu().numpy(), layer.blocksize)
        layer.codes.copy_(torch.from_numpy(np.ascontiguousarray(codes)))
        layer.absmax.copy_(torch.from_numpy(absmax))
        layer._copy_bias(bias)
        return layer

    def dequantize(self, dtype=None, backend: str | None = None) -> torch.Tensor:
        r"""The weight :math:`\hat w_i = \text{code}[q_i]\, c_b`, ``(out, in)``."""
        dtype = self.weight_dtype if dtype is None else as_torch_dtype(dtype)
        return dequantize_blockwise_torch(self.codes, self.absmax, self.code, self.blocksize,
                                          dtype=dtype, backend=backend)

    def quant_config(self) -> dict:
        return {"blocksize": self.blocksize}

    @property
    def nbytes(self) -> int:
        """One byte per weight plus a float32 absmax per block."""
        return int(self.codes.numel() + 4 * self.absmax.numel())

    # -- the state dict (module docstring) ---------------------------------------------
    def weight_state_dict(self, key: str = "weight") -> dict:
        meta = {"shape": [self.out_features, self.in_features], "blocksize": self.blocksize,
                "dtype": str(self.weight_dtype).replace("torch.", "")}
        payload = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        return {key: self.codes.detach().clone(), f"{key}.absmax": self.absmax.detach().clone(),
                f"{key}.quant_map": self.code.detach().clone(),
                f"{key}.{_META}": payload.to(self.device)}

    @staticmethod
    def weight_state_dict_keys(state_dict, key: str = "weight") -> list:
        names = {key} | {f"{key}.{n}" for n in ("absmax", "quant_map", _META)}
        return [k for k in state_dict if k in names]

    def load_weight_state_dict(self, entries: dict, key: str = "weight") -> None:
        missing = [k for k in (key, f"{key}.absmax", f"{key}.quant_map", f"{key}.{_META}")
                   if k not in entries]
        if missing:
            raise ValueError(f"{self.label()}: state dict lacks {missing}")
        try:
            meta = json.loads(bytes(entries[f"{key}.{_META}"].cpu().numpy().astype(np.uint8)))
            shape, blocksize, dtype = tuple(meta["shape"]), meta["blocksize"], meta["dtype"]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{self.label()}: {key}.{_META} does not hold the JSON metadata "
                             f"(shape, blocksize, dtype): {exc}") from None
        mine = ((self.out_features, self.in_features), self.blocksize)
        if (shape, blocksize) != mine:
            raise ValueError(f"{self.label()}: state dict has (shape, blocksize) = "
                             f"{(shape, blocksize)}, layer has {mine}")
        for name, buffer, entry in (("", self.codes, key), ("absmax", self.absmax, None),
                                    ("quant_map", self.code, None)):
            t = entries[entry or f"{key}.{name}"]
            if not isinstance(t, torch.Tensor) or t.dtype != buffer.dtype \
                    or t.shape != buffer.shape:
                raise ValueError(f"{self.label()}: {entry or f'{key}.{name}'} must be "
                                 f"{buffer.dtype} {tuple(buffer.shape)}, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} "
                                 f"{tuple(getattr(t, 'shape', ()))}")
            buffer.copy_(t)
        self.weight_dtype = as_torch_dtype(dtype)
