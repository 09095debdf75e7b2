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
from ..dtypes import float_dtype_name
from ..fourbit import dequantize_4bit
from ..quant_state import QuantState
from ..validation import check_code, check_finite_values, check_positive_int

__all__ = ["TORCH_BACKENDS", "quant_state_tensors", "to_quant_state", "check_quant_tensors",
           "dequantize_absmax_torch", "dequantize_4bit_torch", "dequantize_blockwise_torch", "resolve_torch_backend"]

#: Paths :func:`dequantize_4bit_torch` can take.
TORCH_BACKENDS = ("torch", "cython", "numpy")

_ARRAY_FIELDS = ("packed", "absmax", "code", "nested_absmax", "nested_code")
_META_FIELDS = ("shape", "dtype", "blocksize", "quant_type", "nested_blocksize")

StateLike = Union[QuantState, Mapping]

def _threads(n: int) -> int:
    """Threads for a CPU kernel call on ``n`` values (one for small calls: see :mod:`qlora_ref.backend`)."""
    return _backend.default_num_threads(n)


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


def _host_array(t, name: str) -> np.ndarray | None:
    """A tensor as a 1-D NumPy array on the host (a copy off the CPU), for checking."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor, got {type(t).__name__}")
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: no state field may be one
        raise ValueError(f"{name} must not be bfloat16")
    return t.detach().to("cpu").reshape(-1).numpy()


def check_quant_tensors(tensors: Mapping) -> None:
    """Raise ``ValueError`` unless ``tensors`` is a valid state, by :meth:`QuantState.validate`.

    The same checks as the NumPy core, on a dict of tensors on any device.
    The constants (one per block) and the code tables are copied to the host
    and checked; the packed codes only by length and dtype, through a
    zero-byte stand-in of the same length, so nothing of size ``n`` is copied.
    """
    packed = tensors.get("packed")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a uint8 tensor, got "
                         f"{getattr(packed, 'dtype', type(packed).__name__)}")
    stand_in = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), shape=(packed.numel(),),
                                               strides=(0,))             # (ceil(n/2),), 0 bytes
    kwargs = {name: tensors.get(name) for name in _META_FIELDS}
    for name in _ARRAY_FIELDS[1:]:                                      # all but packed
        kwargs[name] = _host_array(tensors.get(name), name)
    offset = _host_array(tensors.get("offset"), "offset")
    kwargs["offset"] = None if offset is None else (offset[0] if offset.size == 1 else offset)
    try:
        QuantState(packed=stand_in, **kwargs)                            # validates
    except TypeError as exc:  # a metadata field of the wrong kind
        raise ValueError(f"not a valid quantization state: {exc}") from None


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
    """A torch dtype from any spelling :func:`qlora_ref.dtypes.float_dtype_name` accepts."""
    return getattr(torch, float_dtype_name(dtype))


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
                          backend: str | None = None, validate: bool = True) -> torch.Tensor:
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
    validate : bool
        Check the state first (:func:`check_quant_tensors`). Only a caller
        that has checked these very tensors already passes False
        (:class:`~qlora_ref.nn.Linear4bit` does); the CPU paths always check.

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
        if validate:
            check_quant_tensors(t)
        out = _dequantize_4bit_pure_torch(t)
    else:  # the core's kernel (Cython) or reference (NumPy), on zero-copy views
        state = to_quant_state(t)
        # the core returns float32, or bfloat16 (rounded from float32) as uint16 bit patterns
        core_dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"
        out = dequantize_4bit(state, dtype=core_dtype, backend=path,
                              num_threads=_threads(state.n_elements))
        out = torch.from_numpy(out)
        if core_dtype == "bfloat16":
            out = out.view(torch.int16).view(torch.bfloat16)  # reinterpret the bits, no copy
    return out.reshape(tuple(t["shape"])).to(dtype)  # (out, in): float32 rounded once to dtype


def _check_blockwise_tensors(codes, absmax, code, blocksize) -> None:
    """The checks :func:`qlora_ref.dequantize_blockwise` makes, for the pure-torch path."""
    blocksize = check_positive_int(blocksize, "blocksize")
    table = check_code(_host_array(code, "code"), max_size=256)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.numel() == 0:
        raise ValueError(f"codes must be a non-empty uint8 tensor, got "
                         f"{getattr(codes, 'dtype', type(codes).__name__)}")
    n_blocks = -(-codes.numel() // blocksize)
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 \
            or absmax.dim() != 1 or absmax.numel() != n_blocks:
        raise ValueError(f"absmax must hold {n_blocks} float32 values (one per block of "
                         f"{blocksize}); got {getattr(absmax, 'shape', None)} of "
                         f"{getattr(absmax, 'dtype', type(absmax).__name__)}")
    check_finite_values(_host_array(absmax, "absmax"), "absmax")
    if int(codes.max()) >= table.size:
        raise ValueError(f"codes index up to {int(codes.max())}, but the code has {table.size} values")


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
        _check_blockwise_tensors(codes, absmax, code, blocksize)
        out = _scale_blocks(code[codes.reshape(-1).long()], absmax, blocksize)  # (n,) float32
    elif path == "cython":
        check_finite_values(_numpy(absmax), "absmax")  # the kernel computes; it does not check
        out = torch.empty(codes.numel(), dtype=torch.float32)
        _backend.kernels().dequantize_blockwise(_numpy(codes), _numpy(absmax), _numpy(code),
                                                blocksize, out.numpy(), _threads(codes.numel()))
    else:
        from ..blockwise import dequantize_blockwise

        out = torch.from_numpy(dequantize_blockwise(_numpy(codes), _numpy(absmax), _numpy(code),
                                                    blocksize))
    return out.reshape(codes.shape).to(dtype)  # codes' shape, float32 rounded once to dtype
