r"""Dequantization in torch: from stored codes to a weight in the compute dtype, on any device.

Paper section 3, "QLoRA": the base weights are *stored* in NF4 and
*computed* in 16 bits, dequantizing on the fly,

.. math::

    \mathbf{Y} = \mathbf{X}\,\operatorname{doubleDequant}(c_1, c_2, \mathbf{W}^{\text{NF4}})^\top .

This module is that :math:`\operatorname{doubleDequant}` for torch tensors.
Mirrors ``bitsandbytes.functional.dequantize_4bit`` (and
``dequantize_blockwise`` for the 8-bit base). Three paths, chosen here in
Python:

* ``"torch"`` -- pure torch (gather from the code table, scale per block);
  runs on every device, CUDA included, and reads like the NumPy reference;
* ``"cython"`` / ``"numpy"`` -- CPU only: the core's own kernels
  (:func:`qlora_ref.dequantize_4bit`), reached through zero-copy NumPy
  views of the tensors, writing into memory that the returned tensor shares.

All three compute the product in float32 and round once to ``dtype``, so
float32 output equals :func:`qlora_ref.dequantize_4bit` bit for bit, and
bfloat16 output is that float32 result rounded to bfloat16.

Note (torch state): a layer keeps its quantization state as torch tensors
(buffers, so ``.to(device)`` moves them). :func:`quant_state_tensors` turns a
:class:`~qlora_ref.QuantState` into such a dict (zero copy on CPU);
:func:`to_quant_state` turns it back.
"""
from __future__ import annotations

from typing import Mapping, Union

import numpy as np
import torch

from .. import backend as _backend
from ..fourbit import dequantize_4bit
from ..quant_state import QuantState

__all__ = ["TORCH_BACKENDS", "quant_state_tensors", "to_quant_state", "dequantize_absmax_torch",
           "dequantize_4bit_torch", "dequantize_blockwise_torch", "resolve_torch_backend"]

#: Paths :func:`dequantize_4bit_torch` can take.
TORCH_BACKENDS = ("torch", "cython", "numpy")

_ARRAY_FIELDS = ("packed", "absmax", "code", "nested_absmax", "nested_code")
_META_FIELDS = ("shape", "dtype", "blocksize", "quant_type", "nested_blocksize")

StateLike = Union[QuantState, Mapping]

#: Below this many elements the CPU kernels run on one thread: waking a
#: second thread costs more than it saves, and on a busy machine a parallel
#: region can wait milliseconds for a descheduled worker.
PARALLEL_MIN_ELEMENTS = 1 << 16


def _threads(n: int) -> int:
    return 1 if n < PARALLEL_MIN_ELEMENTS else _backend.default_num_threads()


def quant_state_tensors(state: QuantState, device=None) -> dict:
    """A :class:`~qlora_ref.QuantState` as a dict of torch tensors (and its plain metadata).

    Keys are the dataclass field names. Arrays become tensors that share
    memory with the NumPy arrays when ``device`` is CPU (or None); ``offset``
    becomes a 0-d float32 tensor.
    """
    out = {name: getattr(state, name) for name in _META_FIELDS}
    for name in _ARRAY_FIELDS:
        array = getattr(state, name)
        out[name] = None if array is None else torch.from_numpy(array).to(device)
    offset = state.offset
    out["offset"] = (None if offset is None
                     else torch.tensor(np.float32(offset), dtype=torch.float32, device=device))
    return out


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A zero-copy NumPy view of a CPU tensor (made contiguous first if it is not)."""
    return t.detach().contiguous().reshape(-1).numpy()  # (numel,) sharing t's memory


def to_quant_state(tensors: Mapping) -> QuantState:
    """Inverse of :func:`quant_state_tensors`: a NumPy :class:`~qlora_ref.QuantState`.

    CPU tensors are viewed, not copied; tensors on another device are copied to the host.
    """
    kwargs = {name: tensors.get(name) for name in _META_FIELDS}
    for name in _ARRAY_FIELDS:
        t = tensors.get(name)
        kwargs[name] = None if t is None else _numpy(t.to("cpu"))
    offset = tensors.get("offset")
    kwargs["offset"] = None if offset is None else np.float32(float(offset))
    return QuantState(**kwargs)


def resolve_torch_backend(backend: str | None, device) -> str:
    """Pick the dequantization path for tensors on ``device``.

    ``None`` means the core's choice (:func:`qlora_ref.active_backend`:
    Cython when built, unless ``QLORA_REF_BACKEND=numpy``) on CPU, and
    ``"torch"`` on every other device.
    """
    device = torch.device(device)
    if backend is None:
        return _backend.active_backend() if device.type == "cpu" else "torch"
    if backend not in TORCH_BACKENDS:
        raise ValueError(f"backend must be one of {TORCH_BACKENDS} or None, got {backend!r}")
    if backend != "torch" and device.type != "cpu":
        raise ValueError(f"backend {backend!r} runs on CPU only; tensors are on {device} "
                         "(use backend='torch')")
    if backend == "cython":
        _backend.kernels()  # raises if the extension is not built
    return backend


def _as_tensors(state: StateLike, device) -> dict:
    if isinstance(state, QuantState):
        return quant_state_tensors(state, device)
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a QuantState or a dict of tensors, got {type(state).__name__}")
    if device is None:
        return dict(state)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _check_dtype(dtype) -> torch.dtype:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float16, bfloat16, float32 or float64; "
                         f"got {dtype!r}")
    return dtype


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    r"""``values[i] * scales[i // blocksize]`` in float32; a trailing partial block is its own block."""
    n = values.numel()
    n_blocks = scales.numel()
    padded = torch.zeros(n_blocks * blocksize, dtype=torch.float32, device=values.device)
    padded[:n] = values
    blocks = padded.view(n_blocks, blocksize) * scales[:, None]  # (n_blocks, blocksize) float32
    return blocks.view(-1)[:n]                                    # (n,)


def dequantize_absmax_torch(t: Mapping) -> torch.Tensor:
    r"""First-level constants in float32: :math:`\hat c_2 = \text{code}_8[c_2^{\text{FP8}}]\, c_1 + \mu`.

    Without double quantization the constants are stored as they are.
    Mirrors :func:`qlora_ref.double_dequantize` (product, then sum, each
    rounded to float32).
    """
    if t.get("nested_absmax") is None:
        return t["absmax"]
    values = t["nested_code"][t["absmax"].long()]                    # (n_blocks,) in [-1, 1]
    centered = _scale_blocks(values, t["nested_absmax"], int(t["nested_blocksize"]))
    return centered + t["offset"]                                     # (n_blocks,) float32


def _dequantize_4bit_pure_torch(t: Mapping) -> torch.Tensor:
    r""":math:`\hat w_i = \text{code}[q_i]\, c_{\lfloor i / B \rfloor}` with torch ops only."""
    n = int(np.prod(t["shape"]))
    packed = t["packed"].reshape(-1)                                      # (ceil(n/2),) uint8
    # byte j holds element 2j in its high nibble and 2j + 1 in its low nibble
    codes = torch.stack((packed >> 4, packed & 15), dim=1).view(-1)[:n]  # (n,) uint8
    values = t["code"][codes.long()]                                      # (n,) float32
    return _scale_blocks(values, dequantize_absmax_torch(t), int(t["blocksize"]))


def dequantize_4bit_torch(state: StateLike, dtype: torch.dtype = torch.float32, device=None,
                          backend: str | None = None) -> torch.Tensor:
    r"""Dequantize 4-bit weights to a torch tensor of the compute dtype.

    .. math::

        \hat w_i = \text{NF4}[q_i] \cdot \hat c_{2,b}, \qquad
        \hat c_{2,b} = \text{code}_8[c^{\text{FP8}}_{2,b}]\; c_{1,\lfloor b/256 \rfloor} + \mu,
        \qquad b = \lfloor i / B \rfloor

    computed in float32 and rounded once to ``dtype``.

    Parameters
    ----------
    state : QuantState or dict
        A :class:`~qlora_ref.QuantState`, or the dict of tensors from
        :func:`quant_state_tensors` (what a :class:`~qlora_ref.nn.Linear4bit`
        holds as buffers).
    dtype : torch.dtype
        float32, bfloat16, float16, or float64 (for gradient checks).
    device : torch.device or str, optional
        Where to compute; default: where the tensors are (CPU for a QuantState).
    backend : {"torch", "cython", "numpy"} or None
        See :func:`resolve_torch_backend`.

    Returns
    -------
    torch.Tensor
        Shape ``state.shape``, dtype ``dtype``.

    Examples
    --------
    >>> import numpy as np, qlora_ref
    >>> state = qlora_ref.quantize_4bit(np.random.default_rng(0).standard_normal((4, 64)))
    >>> w = dequantize_4bit_torch(state, backend="torch")
    >>> bool((w.numpy() == qlora_ref.dequantize_4bit(state)).all())
    True
    """
    dtype = _check_dtype(dtype)
    t = _as_tensors(state, device)
    path = resolve_torch_backend(backend, t["packed"].device)
    if path == "torch":
        out = _dequantize_4bit_pure_torch(t)
    else:  # the core's kernel (Cython) or reference (NumPy), on zero-copy views
        state = to_quant_state(t)
        # the core returns float32 as NumPy, bfloat16 (rounded from float32) as torch
        core_dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"
        out = dequantize_4bit(state, dtype=core_dtype, backend=path,
                              num_threads=_threads(state.n_elements))
        out = out if isinstance(out, torch.Tensor) else torch.from_numpy(out)
    return out.reshape(tuple(t["shape"])).to(dtype)  # (out, in): float32 rounded once to dtype


def dequantize_blockwise_torch(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                               blocksize: int, dtype: torch.dtype = torch.float32,
                               backend: str | None = None) -> torch.Tensor:
    r"""Dequantize blockwise 8-bit codes: :math:`\hat w_i = \text{code}[q_i]\, c_{\lfloor i/B \rfloor}`.

    The torch twin of :func:`qlora_ref.dequantize_blockwise` (bitsandbytes'
    ``dequantize_blockwise``), for the 8-bit base. Float32 product, rounded
    once to ``dtype``.

    Parameters
    ----------
    codes : torch.Tensor
        uint8 indices into ``code``, any shape (the output has this shape).
    absmax : torch.Tensor
        float32, ``ceil(codes.numel() / blocksize)`` values.
    code : torch.Tensor
        float32 code table (256 values for the dynamic 8-bit code).
    blocksize : int
    dtype : torch.dtype
    backend : {"torch", "cython", "numpy"} or None
        As in :func:`resolve_torch_backend`.
    """
    dtype = _check_dtype(dtype)
    path = resolve_torch_backend(backend, codes.device)
    if path == "torch":
        out = _scale_blocks(code[codes.reshape(-1).long()], absmax, blocksize)  # (n,) float32
    elif path == "cython":
        out = torch.empty(codes.numel(), dtype=torch.float32)
        _backend.kernels().dequantize_blockwise(_numpy(codes), _numpy(absmax), _numpy(code),
                                                blocksize, out.numpy(), _threads(codes.numel()))
    else:
        from ..blockwise import dequantize_blockwise

        out = torch.from_numpy(dequantize_blockwise(_numpy(codes), _numpy(absmax), _numpy(code),
                                                    blocksize))
    return out.reshape(codes.shape).to(dtype)  # codes' shape, float32 rounded once to dtype
