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
from .dtypes import bfloat16_bits, float_dtype_name
from .double_quant import NESTED_BLOCKSIZE, double_dequantize, double_quantize
from .quant_state import QuantState
from .validation import as_float32_flat, check_blocksize, check_num_threads, check_quant_type

__all__ = ["quantize_4bit", "dequantize_4bit", "dequantize_absmax", "run_dequantize_kernel"]


@functools.lru_cache(maxsize=None)
def _tables(quant_type: str):
    """Codebook, its midpoints/sort order, and the pad code (the code of 0.0) -- computed once."""
    code = code_for(quant_type)
    midpoints, order = blockwise.decision_boundaries(code)
    order = order.astype(np.uint8)
    pad = int(blockwise.nearest_code(np.zeros(1, np.float32), code)[0])
    for array in (code, midpoints, order):  # shared by every call: nobody may write them
        array.setflags(write=False)
    return code, midpoints, order, pad


@functools.lru_cache(maxsize=None)
def _dynamic_tables():
    code = dynamic_code()
    midpoints, order = blockwise.decision_boundaries(code)
    order = order.astype(np.uint8)
    for array in (code, midpoints, order):  # shared by every call: nobody may write them
        array.setflags(write=False)
    return code, midpoints, order


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
        Threads for the Cython kernels, 1 to 256 (default:
        :func:`qlora_ref.backend.default_num_threads`).

    Returns
    -------
    QuantState

    Raises
    ------
    ValueError
        Bad arguments or input (empty, not floating point, NaN or inf); with
        ``double_quant``, constants so near the dtype's largest value that
        their 8-bit reconstruction would overflow to ``inf``.

    Examples
    --------
    >>> import numpy as np
    >>> state = quantize_4bit(np.random.default_rng(0).standard_normal((128, 64)))
    >>> state.packed.shape, state.absmax.dtype, round(state.bits_per_param, 3)
    ((4096,), dtype('uint8'), 4.133)
    """
    quant_type = check_quant_type(quant_type)
    blocksize = check_blocksize(blocksize)
    if num_threads is not None:
        check_num_threads(num_threads)
    flat, shape, dtype = as_float32_flat(x)
    backend = resolve_backend(backend)
    code, midpoints, order, pad = _tables(quant_type)

    if backend == "numpy":
        absmax = blockwise.block_absmax(flat, blocksize)                    # (n_blocks,) c_b
        normalized = blockwise.normalize(flat, absmax, blocksize)           # (n,) x / c_b
        codes = blockwise.nearest_code(normalized, code)                    # (n,) uint8
        packed = packing.pack_nibbles(codes, pad=pad)                       # (ceil(n/2),)
    else:
        n_blocks = -(-flat.size // blocksize)
        packed = np.empty((flat.size + 1) // 2, dtype=np.uint8)
        absmax = np.empty(n_blocks, dtype=np.float32)
        kernels().quantize_4bit_packed(flat, midpoints, order, blocksize, pad, packed, absmax,
                                       _threads(num_threads, flat.size))

    if flat.size % blocksize:
        # matches bitsandbytes' CPU path: a trailing partial block stores its absmax clamped
        # at 1e-38 (full blocks store it unclamped); the codes and values are the same either way
        absmax[-1] = max(absmax[-1], blockwise.ABSMAX_FLOOR)
    state = dict(packed=packed, absmax=absmax, shape=shape, dtype=dtype, blocksize=blocksize,
                 quant_type=quant_type, code=np.array(code))
    if double_quant:
        absmax_codes, nested_absmax, offset = _double_quantize(absmax, backend, num_threads)
        _check_double_quant_range(absmax, absmax_codes, nested_absmax, offset, dtype)
        state.update(absmax=absmax_codes, nested_absmax=nested_absmax, offset=offset,
                     nested_code=np.array(_dynamic_tables()[0]),
                     nested_blocksize=NESTED_BLOCKSIZE)
    return QuantState(**state)


def _threads(num_threads, n: int) -> int:
    """The threads a kernel call on ``n`` values uses: as asked (checked), or the default."""
    return default_num_threads(n) if num_threads is None else check_num_threads(num_threads)


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
                                 _threads(num_threads, centered.size))
    return codes, nested_absmax, offset


def _check_double_quant_range(absmax, absmax_codes, nested_absmax, offset, dtype) -> None:
    r"""Refuse a tensor whose double-quantized constants would dequantize to infinity.

    Note (float32 overflow): :math:`\hat c_2 = \text{code}[c_2^{\text{FP8}}]\, c_1 + \mu`
    can round above the largest ``dtype`` value when the constants sit near
    it (e.g. blocks at 3.4e38 beside one small block: :math:`\mu` and
    :math:`c_1` are both near 3.4e38), and every value of that block would
    come back as ``inf``. bitsandbytes computes the same float32 sum, so
    the bytes cannot change to avoid it; we raise instead. The check costs
    one dequantization of the constants, O(n / blocksize).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        hat = double_dequantize(absmax_codes, nested_absmax, offset, NESTED_BLOCKSIZE,
                                _dynamic_tables()[0])                 # (n_blocks,) float32
        largest = np.float32(np.abs(hat).max())
        if dtype == "float16":
            overflow = not np.isfinite(largest.astype(np.float16))
        elif dtype == "bfloat16":
            overflow = int(bfloat16_bits(np.array([largest]))[0]) & 0x7F80 == 0x7F80
        else:
            overflow = not np.isfinite(largest)
    if overflow:
        limit = {"float16": "65504", "bfloat16": "3.3895314e38"}.get(dtype, "3.4028235e38")
        raise ValueError(
            f"double quantization overflows: the block constants (max |x| per block, up to "
            f"{float(absmax.max()):.7g}) dequantize to {float(largest):.7g}, beyond the largest "
            f"{dtype if dtype in ('float16', 'bfloat16') else 'float32'} value {limit}, so blocks "
            f"would come back as inf; use double_quant=False (exact float32 constants) or "
            f"scale the tensor down")


def dequantize_absmax(state: QuantState) -> np.ndarray:
    """The first-level float32 constants of ``state`` (double-dequantized if needed)."""
    if not state.double_quant:
        return state.absmax
    return double_dequantize(state.absmax, state.nested_absmax, state.offset,
                             state.nested_blocksize, state.nested_code)


def run_dequantize_kernel(state, out: np.ndarray, num_threads: int) -> None:
    """Call the Cython kernel that dequantizes ``state`` into ``out``; nothing is checked here.

    ``state`` is anything with the fields of a :class:`QuantState` (NumPy
    arrays, or zero-copy views of CPU tensors); ``out`` is float32, or uint16
    for bfloat16 bits, of ``n`` elements. The caller has validated both
    (:func:`dequantize_4bit` does, and :class:`qlora_ref.nn.Linear4bit` once
    per change of its buffers); the kernel still checks every length.
    """
    # one kernel per layout; it writes float32 or bfloat16 bits by out's dtype
    if state.nested_absmax is not None:
        kernels().dequantize_4bit_packed_nested(
            state.packed, state.absmax, state.nested_absmax, state.nested_code,
            float(state.offset), state.nested_blocksize, state.code, state.blocksize, out,
            num_threads)
    else:
        kernels().dequantize_4bit_packed(state.packed, state.absmax, state.code, state.blocksize,
                                         out, num_threads)


def dequantize_4bit(state: QuantState, dtype=None, backend: str | None = None,
                    num_threads: int | None = None) -> np.ndarray:
    r"""Turn a :class:`QuantState` back into numbers: :math:`\hat w_i = \text{code}[q_i]\, c_b`.

    The product is computed in float32 (as bitsandbytes does) and rounded
    once to ``dtype``.

    Parameters
    ----------
    state : QuantState
    dtype : str, NumPy dtype or torch dtype, optional
        Output dtype; default ``state.dtype``. One of float16, bfloat16,
        float32, float64, in any spelling (:func:`qlora_ref.dtypes.float_dtype_name`).
    backend : {"numpy", "cython"} or None
    num_threads : int, optional
        Threads for the Cython kernel, 1 to 256 (default:
        :func:`qlora_ref.backend.default_num_threads`).

    Returns
    -------
    numpy.ndarray
        Shape ``state.shape``. For bfloat16 (which NumPy lacks) the array is
        ``uint16`` and holds the bfloat16 bit patterns
        (:func:`qlora_ref.dtypes.bfloat16_bits`);
        :func:`qlora_ref.nn.dequantize_4bit_torch` returns a torch tensor instead.

    Examples
    --------
    >>> state = quantize_4bit(np.array([[1.0, -1.0]], np.float32), blocksize=32)
    >>> dequantize_4bit(state, dtype="bfloat16")          # bit patterns of 1.0 and -1.0
    array([[16256, 49024]], dtype=uint16)
    """
    if not isinstance(state, QuantState):
        raise ValueError(f"dequantize_4bit expects a QuantState, got {type(state).__name__}")
    state.validate()
    target = float_dtype_name(state.dtype if dtype is None else dtype)
    if num_threads is not None:
        check_num_threads(num_threads)
    backend = resolve_backend(backend)
    n = state.n_elements

    if backend == "numpy":
        absmax = dequantize_absmax(state)                                   # (n_blocks,) float32
        codes = packing.unpack_nibbles(state.packed, n)                     # (n,) uint8
        out = blockwise.dequantize_blockwise(codes, absmax, state.code, state.blocksize)
        if target == "bfloat16":  # bitsandbytes' CPU rule: subnormal products become zeros
            out = bfloat16_bits(out, flush_subnormals=True)                 # (n,) uint16
    else:
        # bfloat16: the kernel rounds the float32 product itself (the same rule) and
        # writes them as uint16: half the bytes
        out = np.empty(n, dtype=np.uint16 if target == "bfloat16" else np.float32)
        run_dequantize_kernel(state, out, _threads(num_threads, n))
    out = out.reshape(state.shape)
    if target == "bfloat16":
        return out                                                          # uint16 bit patterns
    return out.astype(target, copy=False)
