r"""``Linear4bit``: a frozen linear layer stored in NF4 (the QLoRA base layer).

Paper section 3, "QLoRA": the pretrained weight is kept as
:math:`\mathbf W^{\text{NF4}}` with double-quantized constants
:math:`(c_1, c_2^{\text{FP8}})` and dequantized to the computation dtype
whenever a matmul needs it:

.. math::

    \mathbf Y = \mathbf X\,\operatorname{doubleDequant}(c_1, c_2^{\text{FP8}},
                \mathbf W^{\text{NF4}})^\top + \mathbf b .

Mirrors ``bitsandbytes.nn.Linear4bit`` (frozen-weight use). The buffers are
the fields of :class:`~qlora_ref.QuantState`, under the same names::

    packed          uint8   (ceil(out*in / 2),)
    absmax          uint8 (double quant) or float32   (n_blocks,)
    code            float32 (16,)
    nested_absmax   float32 (ceil(n_blocks / 256),)   double quant only
    nested_code     float32 (256,)                    double quant only
    offset          float32 ()                        double quant only

and its ``state_dict`` holds them under bitsandbytes' names, byte for byte
what a ``bitsandbytes.nn.Linear4bit`` saves
(:func:`~qlora_ref.interop.bitsandbytes.to_linear4bit_state_dict`)::

    weight                                   uint8 (ceil(out*in / 2), 1)  packed
    bias
    weight.absmax, weight.quant_map          absmax, code
    weight.nested_absmax                     nested_absmax                double quant only
    weight.nested_quant_map                  nested_code                  double quant only
    weight.quant_state.bitsandbytes__nf4     JSON: shape, blocksize, quant_type, dtype,
                                             nested_blocksize, nested_offset (= offset)

(``...qlora_ref__int4`` for INT4). A layer that bitsandbytes quantized is
imported bytes unchanged by :meth:`Linear4bit.from_bitsandbytes_layer`.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from types import SimpleNamespace

from ..backend import default_num_threads, kernels
from ..codebooks import code_for, dynamic_code
from ..double_quant import NESTED_BLOCKSIZE, double_dequantize
from ..fourbit import quantize_4bit, run_dequantize_kernel
from ..interop.bitsandbytes import (from_bitsandbytes_linear4bit, from_linear4bit_state_dict,
                                    is_bitsandbytes_linear4bit, linear4bit_state_dict_keys,
                                    to_linear4bit_state_dict)
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
        self._absmax_key = self._absmax_cache = None  # float32 constants (matmul_few_rows)
        self._plan = None  # the fused kernel's inputs (fused_plan)
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

    # -- sharding (FSDP2) -------------------------------------------------------------
    #: The tensors that grow with the weight: sharded by FSDP2 once held as parameters.
    #: The code tables and the scalar offset stay (replicated) buffers: 1,092 bytes a layer.
    SHARDABLE = ("packed", "absmax", "nested_absmax")

    def hold_as_parameters(self) -> "Linear4bit":
        """Hold the codes and constants as frozen ``nn.Parameter`` s instead of buffers (in place).

        FSDP2 (``torch.distributed.fsdp.fully_shard``) shards a module's
        parameters and leaves its buffers whole on every rank, so this is what
        lets it split the 4-bit base: each rank keeps ``1/N`` of ``packed``,
        ``absmax`` and ``nested_absmax`` and all-gathers the *bytes* (uint8, or
        the float32 constants) before the forward and the backward. The layer
        reads them by the same attribute names, so it computes the same bytes;
        its ``state_dict`` keys and values do not change (they are built from
        the tensors, not from the registry). ``requires_grad`` stays False:
        the base is frozen and FSDP2 reduces no gradient for it.
        """
        for name in self.SHARDABLE:
            tensor = self._buffers.get(name)
            if tensor is not None:
                del self._buffers[name]
                self.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
        return self

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

    @staticmethod
    def is_bitsandbytes_layer(module) -> bool:
        """Whether ``module`` is a ``bitsandbytes.nn.Linear4bit`` (bitsandbytes is not imported)."""
        return is_bitsandbytes_linear4bit(module)

    @classmethod
    def from_bitsandbytes_layer(cls, module, compute_dtype=None, quant_bits: int = 4,
                                quant_type: str | None = None, blocksize: int | None = None,
                                double_quant: bool | None = None) -> "Linear4bit":
        """Import a ``bitsandbytes.nn.Linear4bit`` without quantizing again: the same bytes, bias copied.

        The optional format arguments are what the caller asked for (as
        :func:`~qlora_ref.nn.prepare_model` passes them); a layer stored
        otherwise is a ``ValueError``, since its bytes cannot change format
        without quantizing twice. The one exception is double quantization
        of a layer bitsandbytes repacked for its CPU kernel after a forward:
        bitsandbytes dropped it, and the layer is imported as it now computes.
        ``compute_dtype`` defaults to the layer's.
        """
        state = from_bitsandbytes_linear4bit(module)
        asked = {"quant_bits": quant_bits, "quant_type": quant_type, "blocksize": blocksize,
                 "double_quant": double_quant}
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacked it for its CPU kernel and dropped the double quantization
            # itself (qlora_ref.interop.bitsandbytes, module note): imported as it now computes
            asked.pop("double_quant")
        held = {"quant_bits": 4, "quant_type": state.quant_type, "blocksize": state.blocksize,
                "double_quant": state.double_quant}
        wrong = {k: v for k, v in asked.items() if v is not None and v != held[k]}
        if wrong:
            raise ValueError(f"{type(module).__name__}(in_features={module.in_features}, "
                             f"out_features={module.out_features}) is already quantized by "
                             f"bitsandbytes as {held}; asked for {wrong}: pass the layer's own "
                             "settings (its bytes are imported as they are)")
        if compute_dtype is None:
            compute_dtype = getattr(module, "compute_dtype", None)
        bias = None if module.bias is None else module.bias.detach()
        return cls.from_quant_state(state, bias=bias, compute_dtype=compute_dtype)

    def load_quant_state(self, state: QuantState) -> None:
        """Copy ``state``'s bytes into this layer's buffers (its format must match)."""
        expected = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                    "double_quant": self.double_quant,
                    "shape": (self.out_features, self.in_features)}
        got = {"quant_type": state.quant_type, "blocksize": state.blocksize,
               "double_quant": state.double_quant, "shape": tuple(state.shape)}
        if got != expected:
            theirs = ", ".join(f"{k}={v!r}" for k, v in got.items() if v != expected[k])
            mine = ", ".join(f"{k}={v!r}" for k, v in expected.items() if v != got[k])
            raise ValueError(f"{self.label()}: the stored weight has {theirs}; the layer has {mine}")
        for name, t in quant_state_tensors(state).items():
            if isinstance(t, torch.Tensor):
                getattr(self, name).copy_(t)
        self.weight_dtype = as_torch_dtype(state.dtype)

    # -- the quantized weight -----------------------------------------------------
    def quant_tensors(self) -> dict:
        """The buffers and metadata as the dict :func:`~qlora_ref.nn.dequantize_4bit_torch` reads."""
        tensors = {name: getattr(self, name) for name in ("packed", "absmax", "code",
                                                          "nested_absmax", "nested_code",
                                                          "offset")}
        for name in self.SHARDABLE:  # held by FSDP2: copies, see _as_numpy (note)
            if name in self._parameters and tensors[name] is not None:
                tensors[name] = tensors[name].detach().clone()
        return {**tensors, **self._metadata()}

    def quant_state(self) -> QuantState:
        """A NumPy :class:`~qlora_ref.QuantState` copy of the stored weight."""
        t = self.quant_tensors()
        arrays = {k: (None if v is None else v.detach().cpu().clone().numpy())
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

    #: Most rows of ``x`` (tokens) :meth:`matmul_few_rows` takes. Measured on one thread
    #: (AVX-512 host, 2026-12-02; 128x512, 512x128, 1024x1024, 4096x4096 layers), the fused
    #: kernel took at most the time of dequantize + ``F.linear`` up to 32 rows, and more
    #: from 64 rows on for the three small layers (it reads the codes once per 8 rows).
    FUSED_MAX_ROWS = 32

    def matmul_few_rows(self, x: torch.Tensor, bias: torch.Tensor | None = None):
        r""":math:`\mathbf X\hat{\mathbf W}^\top + \mathbf b` straight from the codes, for a few rows; None where that does not apply.

        Generating a token reads every weight once, so it runs at the speed of
        reading the weights. :meth:`dequantize` writes the whole ``(out, in)``
        matrix and ``F.linear`` reads it again; the fused kernel
        (``quant4.gemv_4bit``, ``qlora_ref/_kernels/gemv4.h``) reads only the
        4-bit codes and the constants. Every weight it multiplies is the same
        float32 product as :meth:`dequantize`'s, so the result differs from
        ``F.linear(x, self.dequantize(torch.float32), bias)`` only in the order
        of the float32 sums (it is computed in float32 and rounded once to
        ``x.dtype``).

        Returns None (the caller then dequantizes) unless: the input is on the
        CPU with at most :data:`FUSED_MAX_ROWS` rows and not float64 (which
        must not be summed in float32), the extension is built
        and the CPU has a vector path (AVX2 or AVX-512; the portable loop
        would be slower than dequantize + matmul), and rows of ``W`` are whole
        blocks (``in_features % blocksize == 0``): see :meth:`fused_plan`.
        """
        rows = x.numel() // self.in_features
        if (not 1 <= rows <= self.FUSED_MAX_ROWS or x.dtype == torch.float64
                or x.device.type != "cpu"):
            return None
        plan = self.fused_plan()
        if plan is None:
            return None
        x32 = x.reshape(rows, self.in_features).to(torch.float32).contiguous()  # (rows, in)
        y = self.fused_matmul(x32, plan)                                          # (rows, out)
        if bias is not None:
            y += bias.to(torch.float32)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def fused_plan(self) -> SimpleNamespace | None:
        """What the fused kernel reads, checked and prepared once per change of the buffers.

        None where the kernel does not apply to this layer (a buffer off the
        CPU, ``in_features % blocksize``, the extension not built or forced
        off by ``QLORA_REF_BACKEND``, no vector path, FSDP2 parameters).

        Note (validated once): a decoded token calls every layer once, and
        re-checking the buffers (:meth:`_validate_if_changed`: every buffer's
        device, address and version through ``nn.Module.__getattr__``) and
        re-making their NumPy views cost about as much as the kernel on
        SmolLM2's layers. The plan keeps the buffer tensors it was made from
        and their versions; it is reused while the layer still holds those
        very tensors, unwritten (``load_state_dict`` and ``copy_`` bump the
        version, ``.to()`` replaces them) and ``QLORA_REF_BACKEND`` is unchanged.
        """
        plan, buffers = self._plan, self._buffers
        forced = os.environ.get("QLORA_REF_BACKEND")
        if plan is not None and plan.forced == forced and all(
                buffers.get(name) is t and t._version == v for name, t, v in plan.watch):
            return plan.fused
        self._validate_if_changed()  # raises on bad buffers, as the other paths do
        watch = tuple((name, t, t._version) for name, t in buffers.items() if t is not None)
        fused = None
        if (self.packed.device.type == "cpu" and not self.in_features % self.blocksize
                and not any(name in self._parameters for name in self.SHARDABLE)
                and resolve_torch_backend(None, self.packed.device) == "cython"
                and kernels().simd_level() != "portable"):
            fused = SimpleNamespace(packed=self.packed.numpy(),
                                    absmax=self._absmax_float32(), code=self.code.numpy(),
                                    blocksize=self.blocksize)
        self._plan = SimpleNamespace(forced=forced, watch=watch, fused=fused)
        return fused

    def fused_matmul(self, x32: torch.Tensor, plan: SimpleNamespace) -> torch.Tensor:
        r""":math:`\mathbf X\hat{\mathbf W}^\top` in float32 for ``x32`` ``(rows, in)`` float32 contiguous; no checks.

        The kernel call of :meth:`matmul_few_rows` alone, for callers that hold
        a :meth:`fused_plan` and have checked ``x32`` (the lean decoding path
        of :class:`~qlora_ref.nn.LoRALinear`). Returns ``(rows, out)`` float32.
        """
        y = torch.empty(x32.shape[0], self.out_features, dtype=torch.float32)  # (rows, out)
        kernels().gemv_4bit(plan.packed, plan.absmax, plan.code, plan.blocksize, x32.numpy(), y.numpy(),
                  default_num_threads(self.weight_numel))
        return y

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_plan"] = None  # copies and pickles leave the plan behind (views of this layer)
        return state

    def _apply(self, fn, recurse=True):
        self._plan = None  # moved or cast: the plan's tensors are not the layer's any more
        return super()._apply(fn, recurse)

    def _absmax_float32(self) -> np.ndarray:
        """The first-level constants as float32 (double-dequantized once per change of the buffers)."""
        if self._absmax_key != self._validated:
            v = self._numpy_views()
            self._absmax_cache = (np.ascontiguousarray(double_dequantize(
                v.absmax, v.nested_absmax, np.float32(v.offset), NESTED_BLOCKSIZE, v.nested_code))
                if self.double_quant else v.absmax)
            self._absmax_key = self._validated
        return self._absmax_cache

    def _numpy_views(self) -> SimpleNamespace:
        """The CPU buffers as zero-copy NumPy arrays, under :class:`~qlora_ref.QuantState`'s names."""
        views = {name: self._as_numpy(name)
                 for name in ("packed", "absmax", "code", "nested_absmax", "nested_code")}
        return SimpleNamespace(**views, blocksize=self.blocksize, nested_blocksize=NESTED_BLOCKSIZE,
                               offset=None if self.offset is None else float(self.offset))

    def _as_numpy(self, name: str) -> np.ndarray | None:
        """A CPU tensor of the layer as a NumPy array: a zero-copy view of a buffer, a copy of a parameter.

        Note (FSDP2): a layer sharded by FSDP2 holds these tensors as parameters
        (:meth:`hold_as_parameters`), and FSDP2 frees the gathered copy after
        use by resizing its storage to 0. A NumPy view pins a storage (torch
        then refuses the resize), so the kernels read a copy of those bytes
        (half a byte per weight, beside the 4 bytes per weight they write).
        """
        t = getattr(self, name)
        if t is None:
            return None
        return t.detach().clone().numpy() if name in self._parameters else t.numpy()

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

    def _metadata(self) -> dict:
        return {"shape": (self.out_features, self.in_features), "blocksize": self.blocksize,
                "quant_type": self.quant_type,
                "dtype": str(self.weight_dtype).replace("torch.", ""),
                "nested_blocksize": NESTED_BLOCKSIZE if self.double_quant else None}

    # -- the state dict: bitsandbytes' entries (module docstring) --------------------
    def weight_state_dict(self, key: str = "weight") -> dict:
        entries = to_linear4bit_state_dict(self.quant_state(), key)
        return {k: v.to(self.device) for k, v in entries.items()}

    @staticmethod
    def weight_state_dict_keys(state_dict, key: str = "weight") -> list:
        return linear4bit_state_dict_keys(state_dict, key)

    def load_weight_state_dict(self, entries: dict, key: str = "weight") -> None:
        try:
            state = from_linear4bit_state_dict(entries, key)
        except ValueError as exc:
            raise ValueError(f"{self.label()}: {exc}") from None
        self.load_quant_state(state)


def lean_kernel(plan, in_features: int, out_features: int, round_input: bool, a_t=None,
                blocks=(), bias=None, max_rows: int | None = None):
    """A ``LeanProjection`` (``_kernels/decode_step.pxi``) of a fused plan, its adapters and bias.

    ``a_t``: the stacked ``A^T`` ``(in, sum r)`` float32, or None (no adapters);
    ``blocks``: one ``(o0, o1, r0, r1, B_i^T, s_i)`` per adapted layer, ``B_i^T``
    ``(r_i, o1 - o0)`` float32; ``bias``: ``(out,)`` float32 or None. The kernel
    keeps views of these arrays (and copies of ``B^T`` and the block table).
    Shared by :class:`~qlora_ref.nn.projection.Projection` (joined layers) and
    :meth:`~qlora_ref.nn.LoRALinear._decode_kernel` (one layer).
    """
    lora = {}
    if a_t is not None:
        lora = dict(
            a_t=a_t.numpy(),                                               # (in, sum r)
            b_t=np.concatenate([b_t.reshape(-1).numpy() for *_, b_t, _ in blocks]),
            blocks=np.array([blk[:4] for blk in blocks], dtype=np.intp).reshape(-1),
            scales=np.array([blk[5] for blk in blocks], dtype=np.float32))
    if max_rows is not None:
        lora["max_rows"] = max_rows
    return kernels().LeanProjection(
        plan.packed, plan.absmax, plan.code, plan.blocksize, in_features, out_features,
        round_input, bias=None if bias is None else bias.numpy(), **lora)
