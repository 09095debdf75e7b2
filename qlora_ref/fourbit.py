r"""The 4-bit API: ``quantize_4bit`` and ``dequantize_4bit``.

Paper section 3, "QLoRA": the storage data type of the frozen base is NF4
with blocksize 64, and its constants are double quantized. This module
composes the pieces, each in its own module:

1. :mod:`~qlora_ref.codebooks` -- the 16 code values;
2. :mod:`~qlora_ref.blockwise` -- absmax per block, nearest code;
3. :mod:`~qlora_ref.packing` -- two codes per byte;
4. :mod:`~qlora_ref.double_quant` -- 8-bit constants.

Mirrors ``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit``:
same layout, same bytes (the tests check every field against it).
"""
from __future__ import annotations

import functools

import numpy as np

from . import blockwise, packing
from .backend import default_num_threads, kernels, resolve_backend
from .codebooks import code_for, dynamic_code
from .double_quant import NESTED_BLOCKSIZE, double_dequantize, double_quantize
from .quant_state import QuantState
from .validation import as_float32_flat, check_blocksize, check_quant_type

__all__ = ["quantize_4bit", "dequantize_4bit", "dequantize_absmax"]


@functools.lru_cache(maxsize=None)
def _tables(quant_type: str):
    """Codebook, its midpoints/sort order, and the pad code (the code of 0.0) -- computed once."""
    code = code_for(quant_type)
    midpoints, order = blockwise.decision_boundaries(code)
    pad = int(blockwise.nearest_code(np.zeros(1, np.float32), code)[0])
    for array in (code, midpoints, order):
        array.setflags(write=False)
    return code, midpoints, order.astype(np.uint8), pad


@functools.lru_cache(maxsize=None)
def _dynamic_tables():
    code = dynamic_code()
    midpoints, order = blockwise.decision_boundaries(code)
    for array in (code, midpoints, order):
        array.setflags(write=False)
    return code, midpoints, order.astype(np.uint8)


def quantize_4bit(x, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                  backend: str | None = None, num_threads: int | None = None) -> QuantState:
    r"""Quantize a float tensor to 4 bits, blockwise, as QLoRA stores its base weights.

    .. math::

        \mathbf{W}^{\text{NF4}} = \operatorname{pack}\big(
            \operatorname*{arg\,min}_j |\text{NF4}_j - w_i / c_b|\big),\qquad
        c_b = \max_{i \in b}|w_i|

    Parameters
    ----------
    x : numpy.ndarray or torch.Tensor
        float16, bfloat16 (torch only), float32 or float64; any shape,
        flattened in C order. float64 is rounded to float32 first.
    quant_type : {"nf4", "fp4", "int4"}
        The 4-bit data type. ``"int4"`` is for comparison (bitsandbytes has no
        4-bit integer storage).
    blocksize : int
        32, 64, ..., 4096 elements per absmax constant.
    double_quant : bool
        Quantize the absmax constants to 8 bits (blocksize 256), as QLoRA does.
    backend : {"numpy", "cython"} or None
        ``None`` picks Cython when built (see :mod:`qlora_ref.backend`).
    num_threads : int, optional
        Threads for the Cython kernels (default: all cores).

    Returns
    -------
    QuantState

    Examples
    --------
    >>> import numpy as np
    >>> state = quantize_4bit(np.random.default_rng(0).standard_normal((128, 64)))
    >>> state.packed.shape, state.absmax.dtype, round(state.bits_per_param, 3)
    ((4096,), dtype('uint8'), 4.133)
    """
    quant_type = check_quant_type(quant_type)
    blocksize = check_blocksize(blocksize)
    flat, shape, dtype = as_float32_flat(x)
    backend = resolve_backend(backend)
    code, midpoints, order, pad = _tables(quant_type)

    if backend == "numpy":
        codes, absmax = blockwise.quantize_blockwise(flat, code, blocksize)  # (n,), (n_blocks,)
        packed = packing.pack_nibbles(codes, pad=pad)                       # (ceil(n/2),)
    else:
        n_blocks = -(-flat.size // blocksize)
        packed = np.empty((flat.size + 1) // 2, dtype=np.uint8)
        absmax = np.empty(n_blocks, dtype=np.float32)
        kernels().quantize_4bit_packed(flat, midpoints, order, blocksize, pad, packed, absmax,
                                       num_threads or default_num_threads())

    state = dict(packed=packed, absmax=absmax, shape=shape, dtype=dtype, blocksize=blocksize,
                 quant_type=quant_type, code=np.array(code))
    if double_quant:
        absmax_codes, nested_absmax, offset = _double_quantize(absmax, backend, num_threads)
        state.update(absmax=absmax_codes, nested_absmax=nested_absmax, offset=offset,
                     nested_code=np.array(_dynamic_tables()[0]),
                     nested_blocksize=NESTED_BLOCKSIZE)
    return QuantState(**state)


def _double_quantize(absmax, backend, num_threads):
    if backend == "numpy":
        return double_quantize(absmax)
    code, midpoints, order = _dynamic_tables()
    offset = np.float32(np.mean(absmax, dtype=np.float64))   # same mean as the reference
    centered = absmax - offset
    nested_bs = NESTED_BLOCKSIZE
    codes = np.empty(centered.size, dtype=np.uint8)
    nested_absmax = np.empty(-(-centered.size // nested_bs), dtype=np.float32)
    kernels().quantize_blockwise(centered, midpoints, order, 8, nested_bs, codes, nested_absmax,
                                 num_threads or default_num_threads())
    return codes, nested_absmax, offset


def dequantize_absmax(state: QuantState) -> np.ndarray:
    """The first-level float32 constants of ``state`` (double-dequantized if needed)."""
    if not state.double_quant:
        return state.absmax
    return double_dequantize(state.absmax, state.nested_absmax, state.offset,
                                          state.nested_blocksize)


def dequantize_4bit(state: QuantState, dtype=None, backend: str | None = None,
                    num_threads: int | None = None):
    r"""Turn a :class:`QuantState` back into numbers: :math:`\hat w_i = \text{code}[q_i]\, c_b`.

    The product is computed in float32 (as bitsandbytes does) and rounded
    once to ``dtype``.

    Parameters
    ----------
    state : QuantState
    dtype : str or numpy dtype, optional
        Output dtype; default ``state.dtype``. ``"bfloat16"`` (NumPy has no
        bfloat16) returns a ``torch.Tensor``; every other dtype a NumPy array.
    backend : {"numpy", "cython"} or None

    Returns
    -------
    numpy.ndarray or torch.Tensor
        Shape ``state.shape``.
    """
    if not isinstance(state, QuantState):
        raise ValueError(f"dequantize_4bit expects a QuantState, got {type(state).__name__}")
    state.validate()
    target = np.dtype(dtype).name if dtype is not None and str(dtype) != "bfloat16" \
        else (str(dtype) if dtype is not None else state.dtype)
    target = target.replace("torch.", "")
    if target not in ("float16", "bfloat16", "float32", "float64"):
        raise ValueError(f"dtype must be float16, bfloat16, float32 or float64; got {dtype!r}")
    backend = resolve_backend(backend)
    n = state.n_elements

    if backend == "numpy":
        absmax = dequantize_absmax(state)                                   # (n_blocks,) float32
        codes = packing.unpack_nibbles(state.packed, n)                     # (n,) uint8
        out = blockwise.dequantize_blockwise(codes, absmax, state.code, state.blocksize)
    else:
        # bfloat16: the kernel rounds the float32 product itself (the bits torch's
        # .to(torch.bfloat16) gives) and writes them as uint16: half the bytes
        bf16 = target == "bfloat16"
        out = np.empty(n, dtype=np.uint16 if bf16 else np.float32)
        threads = num_threads or default_num_threads()
        if state.double_quant:
            kernel = (kernels().dequantize_4bit_packed_nested_bf16 if bf16
                      else kernels().dequantize_4bit_packed_nested)
            kernel(state.packed, state.absmax, state.nested_absmax, state.nested_code,
                   float(state.offset), state.nested_blocksize, state.code, state.blocksize, out,
                   threads)
        else:
            kernel = (kernels().dequantize_4bit_packed_bf16 if bf16
                      else kernels().dequantize_4bit_packed)
            kernel(state.packed, state.absmax, state.code, state.blocksize, out, threads)
    out = out.reshape(state.shape)
    if target == "bfloat16":
        import torch  # only reached for bfloat16, which only torch inputs produce

        if out.dtype == np.uint16:  # bfloat16 bits from the Cython kernel
            return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(out).to(torch.bfloat16)
    return out.astype(target, copy=False)
