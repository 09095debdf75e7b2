r"""``Linear4bit``: a frozen linear layer stored in NF4 (the QLoRA base layer).

Paper section 3, "QLoRA": the pretrained weight is kept as
:math:`\mathbf W^{\text{NF4}}` with double-quantized constants
:math:`(c_1, c_2^{\text{FP8}})` and dequantized to the computation dtype
whenever a matmul needs it:

.. math::

    \mathbf Y = \mathbf X\,\operatorname{doubleDequant}(c_1, c_2^{\text{FP8}},
                \mathbf W^{\text{NF4}})^\top + \mathbf b .

Mirrors ``bitsandbytes.nn.Linear4bit`` (frozen-weight use). The buffers are
the fields of :class:`~qlora_ref.QuantState`, under the same names, so a
``state_dict`` holds exactly the packed bytes and constants::

    packed          uint8   (ceil(out*in / 2),)
    absmax          uint8 (double quant) or float32   (n_blocks,)
    code            float32 (16,)
    nested_absmax   float32 (ceil(n_blocks / 256),)   double quant only
    nested_code     float32 (256,)                    double quant only
    offset          float32 ()                        double quant only
    _extra_state    shape, blocksize, quant_type, dtype, nested_blocksize
"""
from __future__ import annotations

import numpy as np
import torch

from types import SimpleNamespace

from ..backend import default_num_threads
from ..codebooks import code_for, dynamic_code
from ..double_quant import NESTED_BLOCKSIZE
from ..fourbit import quantize_4bit, run_dequantize_kernel
from ..quant_state import QuantState
from ..validation import check_blocksize, check_quant_type
from .functional import (check_quant_tensors, dequantize_4bit_torch, quant_state_tensors,
                         resolve_torch_backend)
from .quantized import QuantizedLinear, as_torch_dtype

__all__ = ["Linear4bit"]


class Linear4bit(QuantizedLinear):
    """Frozen linear layer with a 4-bit blockwise weight (NF4 by default, double quantized).

    Build one from a trained layer with :meth:`from_linear`; the constructor
    makes an all-zero layer of the right buffer sizes (to ``load_state_dict`` into).

    Parameters
    ----------
    in_features, out_features : int
    bias : bool
    quant_type : {"nf4", "fp4", "int4"}
    blocksize : int
        Weights per absmax constant (paper: 64).
    double_quant : bool
        Quantize the absmax constants to 8 bits (paper: yes).
    compute_dtype : torch.dtype, optional
        See :class:`~qlora_ref.nn.QuantizedLinear`.
    weight_dtype : torch.dtype or str
        dtype of the weight before quantization.

    Examples
    --------
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> layer = Linear4bit.from_linear(torch.nn.Linear(128, 64))
    >>> layer(torch.randn(3, 128)).shape
    torch.Size([3, 64])
    >>> layer.nbytes  # 4096 packed + 128 absmax codes + 4 nested absmax + 4 offset
    4232
    """

    bits = 4

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                 compute_dtype=None, weight_dtype=torch.float32, device=None):
        super().__init__(in_features, out_features, bias, compute_dtype, weight_dtype, device)
        self.quant_type = check_quant_type(quant_type)
        self.blocksize = check_blocksize(blocksize)
        self.double_quant = bool(double_quant)
        self._validated = None  # the buffers' identity when last checked (see dequantize)
        n = self.weight_numel
        n_blocks = -(-n // self.blocksize)
        zeros = lambda size, dtype: torch.zeros(size, dtype=dtype, device=device)  # noqa: E731
        self.register_buffer("packed", zeros((n + 1) // 2, torch.uint8))
        self.register_buffer("absmax", zeros(n_blocks, torch.uint8 if double_quant
                                             else torch.float32))
        self.register_buffer("code", torch.tensor(code_for(quant_type), device=device))
        if double_quant:
            self.register_buffer("nested_absmax", zeros(-(-n_blocks // NESTED_BLOCKSIZE),
                                                        torch.float32))
            self.register_buffer("nested_code", torch.tensor(dynamic_code(), device=device))
            self.register_buffer("offset", zeros((), torch.float32))
        else:
            for name in ("nested_absmax", "nested_code", "offset"):
                self.register_buffer(name, None)

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True, compute_dtype=None) -> "Linear4bit":
        """Quantize an ``nn.Linear`` (the original is untouched; its bias is copied)."""
        return super().from_linear(linear, compute_dtype=compute_dtype, quant_type=quant_type,
                                   blocksize=blocksize, double_quant=double_quant)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    compute_dtype=None, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True) -> "Linear4bit":
        r"""Quantize a float ``(out, in)`` weight with :func:`qlora_ref.quantize_4bit`."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"Linear4bit.from_weight expects a 2-D weight tensor, got "
                             f"{getattr(weight, 'shape', type(weight).__name__)}")
        state = quantize_4bit(weight.detach(), quant_type=quant_type, blocksize=blocksize,
                              double_quant=double_quant)
        return cls.from_quant_state(state, bias=bias, compute_dtype=compute_dtype)

    @classmethod
    def from_quant_state(cls, state: QuantState, bias: torch.Tensor | None = None,
                         compute_dtype=None) -> "Linear4bit":
        """Wrap an existing :class:`~qlora_ref.QuantState` of a 2-D ``(out, in)`` weight."""
        if len(state.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D (out, in) weight, got shape {state.shape}")
        out_features, in_features = state.shape
        device = bias.device if bias is not None else None
        layer = cls(in_features, out_features, bias=bias is not None, quant_type=state.quant_type,
                    blocksize=state.blocksize, double_quant=state.double_quant,
                    compute_dtype=compute_dtype, weight_dtype=state.dtype, device=device)
        layer.load_quant_state(state)
        layer._copy_bias(bias)
        return layer

    def load_quant_state(self, state: QuantState) -> None:
        """Copy ``state``'s bytes into this layer's buffers (its format must match)."""
        expected = (self.quant_type, self.blocksize, self.double_quant,
                    (self.out_features, self.in_features))
        got = (state.quant_type, state.blocksize, state.double_quant, state.shape)
        if got != expected:
            raise ValueError(f"{self.label()}: QuantState (quant_type, blocksize, double_quant, "
                             f"shape) = {got}, layer has {expected}")
        for name, t in quant_state_tensors(state).items():
            if isinstance(t, torch.Tensor):
                getattr(self, name).copy_(t)
        self.weight_dtype = as_torch_dtype(state.dtype)

    # -- the quantized weight -----------------------------------------------------
    def quant_tensors(self) -> dict:
        """The buffers and metadata as the dict :func:`~qlora_ref.nn.dequantize_4bit_torch` reads."""
        return {"packed": self.packed, "absmax": self.absmax, "code": self.code,
                "nested_absmax": self.nested_absmax, "nested_code": self.nested_code,
                "offset": self.offset, **self.get_extra_state()}

    def quant_state(self) -> QuantState:
        """A NumPy :class:`~qlora_ref.QuantState` copy of the stored weight."""
        t = self.quant_tensors()
        arrays = {k: (None if v is None else v.detach().cpu().numpy().copy())
                  for k, v in t.items() if isinstance(v, torch.Tensor) or v is None}
        offset = arrays.pop("offset")
        meta = {k: v for k, v in t.items() if not isinstance(v, torch.Tensor) and v is not None}
        return QuantState(**arrays, **meta,
                          offset=None if offset is None else np.float32(offset))

    def dequantize(self, dtype=None, backend: str | None = None) -> torch.Tensor:
        r"""The weight :math:`\operatorname{doubleDequant}(c_1, c_2, \mathbf W^{\text{NF4}})`, ``(out, in)``.

        On CPU with the extension built, the Cython kernel writes straight into
        the returned tensor; elsewhere the readable twins run (pure torch on
        any device, or the NumPy reference with ``backend="numpy"``).

        Note (validated once): the buffers are checked
        (:func:`~qlora_ref.nn.functional.check_quant_tensors`) the first time
        and again only after they change (loaded, moved or written to: torch
        counts every in-place write), not on every forward and backward.
        """
        dtype = self.weight_dtype if dtype is None else as_torch_dtype(dtype)
        self._validate_if_changed()
        path = resolve_torch_backend(backend, self.packed.device)
        if path != "cython":
            return dequantize_4bit_torch(self.quant_tensors(), dtype=dtype, backend=path,
                                         validate=False)
        bf16 = dtype == torch.bfloat16  # the kernel rounds to bfloat16 itself (as uint16 bits)
        out = torch.empty(self.out_features, self.in_features,
                          dtype=torch.int16 if bf16 else torch.float32)  # (out, in)
        flat = out.numpy().reshape(-1)                                    # zero-copy view
        run_dequantize_kernel(self._numpy_views(), flat.view(np.uint16) if bf16 else flat,
                              default_num_threads(flat.size))
        return out.view(torch.bfloat16) if bf16 else out.to(dtype)

    def _numpy_views(self) -> SimpleNamespace:
        """The CPU buffers as zero-copy NumPy arrays, under :class:`~qlora_ref.QuantState`'s names."""
        views = {name: None if getattr(self, name) is None else getattr(self, name).numpy()
                 for name in ("packed", "absmax", "code", "nested_absmax", "nested_code")}
        return SimpleNamespace(**views, blocksize=self.blocksize, nested_blocksize=NESTED_BLOCKSIZE,
                               offset=None if self.offset is None else float(self.offset))

    def _validate_if_changed(self) -> None:
        buffers = (self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code,
                   self.offset)
        key = tuple((b.device, b.data_ptr(), b._version) for b in buffers if b is not None)
        if key != self._validated:
            check_quant_tensors(self.quant_tensors())
            self._validated = key

    def quant_config(self) -> dict:
        return {"quant_type": self.quant_type, "blocksize": self.blocksize,
                "double_quant": self.double_quant}

    @property
    def nbytes(self) -> int:
        """Packed codes + absmax (+ nested absmax and the float32 offset): ``QuantState.nbytes``."""
        total = self.packed.numel() + self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            total += self.nested_absmax.numel() * 4 + 4
        return int(total)

    # -- metadata in the state dict -------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"shape": (self.out_features, self.in_features), "blocksize": self.blocksize,
                "quant_type": self.quant_type,
                "dtype": str(self.weight_dtype).replace("torch.", ""),
                "nested_blocksize": NESTED_BLOCKSIZE if self.double_quant else None}

    def set_extra_state(self, state: dict) -> None:
        mine = self.get_extra_state()
        for key in ("shape", "blocksize", "quant_type", "nested_blocksize"):
            theirs = tuple(state[key]) if key == "shape" else state.get(key)
            if theirs != mine[key]:
                raise ValueError(f"{self.label()}: state dict has {key}={theirs!r}, "
                                 f"layer has {mine[key]!r}")
        self.weight_dtype = as_torch_dtype(state["dtype"])
