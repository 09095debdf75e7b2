"""Input checks shared by the quantization functions.

Public functions validate here, then call a kernel (NumPy or Cython) that
assumes clean input, the way bitsandbytes' ``functional`` module validates
before calling its ops. Every failure is a ``ValueError`` that names the
problem; nothing reaches a kernel that could crash or return garbage.

Torch tensors are accepted without importing torch: we recognise them by
their type's module and convert through ``.float().numpy()``.
"""
from __future__ import annotations

import numpy as np

from .dtypes import FLOAT_DTYPES

__all__ = ["VALID_BLOCKSIZES", "QUANT_TYPES", "as_float32_flat", "check_blocksize",
           "check_quant_type", "check_positive_int", "check_code", "check_num_threads",
           "MAX_THREADS", "dtype_name"]

#: Blocksizes bitsandbytes accepts for 4-bit quantization (powers of two).
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: The 4-bit data types this package implements.
QUANT_TYPES = ("nf4", "fp4", "int4")



def _is_torch_tensor(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


def dtype_name(x) -> str:
    """The dtype of a NumPy array or torch tensor as a short string, e.g. ``"bfloat16"``."""
    if _is_torch_tensor(x):
        return str(x.dtype).replace("torch.", "")
    return np.asarray(x).dtype.name


def as_float32_flat(x, what: str = "input") -> tuple[np.ndarray, tuple[int, ...], str]:
    """Validate ``x`` and return it flattened as float32, with its shape and dtype name.

    float16 and bfloat16 convert to float32 exactly; float64 is rounded to
    float32 once (bitsandbytes' kernels compute in float32 too).

    Raises
    ------
    ValueError
        If ``x`` is empty, not a floating dtype (integer, bool, complex),
        or holds NaN or infinity.
    """
    name = dtype_name(x)
    if name not in FLOAT_DTYPES:
        raise ValueError(
            f"{what} must be a floating-point array (one of {', '.join(FLOAT_DTYPES)}); "
            f"got dtype {name}")
    if _is_torch_tensor(x):
        shape = tuple(int(s) for s in x.shape)
        flat = x.detach().to("cpu").reshape(-1).float().numpy()
    else:
        x = np.asarray(x)
        shape = tuple(x.shape)
        flat = x.reshape(-1).astype(np.float32, copy=False)
    if flat.size == 0:
        raise ValueError(f"{what} is empty (shape {shape}); there is nothing to quantize")
    if not np.isfinite(flat).all():
        bad = int(np.count_nonzero(~np.isfinite(flat)))
        raise ValueError(
            f"{what} holds {bad} NaN or infinite value(s); quantization needs finite numbers")
    return np.ascontiguousarray(flat), shape, name


def check_blocksize(blocksize, valid=VALID_BLOCKSIZES) -> int:
    """Return ``blocksize`` as an int if it is one of ``valid``, else raise ``ValueError``."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) \
            or int(blocksize) not in valid:
        raise ValueError(f"blocksize must be one of {valid}; got {blocksize!r}")
    return int(blocksize)


def check_quant_type(quant_type) -> str:
    """Return ``quant_type`` if it is a known 4-bit type, else raise ``ValueError``."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}; got {quant_type!r}")
    return quant_type


def check_positive_int(value, name: str) -> int:
    """Return ``value`` as an int if it is an integer >= 1, else raise ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def check_code(code, max_size: int = 256) -> np.ndarray:
    """A codebook as a 1-D float32 array of 2..``max_size`` finite values in [-1, 1]."""
    array = np.asarray(code)
    if array.ndim != 1 or not 2 <= array.size <= max_size or array.dtype.kind != "f":
        raise ValueError(f"code must be a 1-D float array of 2 to {max_size} values; got shape "
                         f"{array.shape} of {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if not (np.isfinite(array).all() and np.abs(array).max() <= 1):
        raise ValueError("code values must be finite and within [-1, 1]")
    return array


#: The most threads a kernel call may ask for (libgomp aborts the process when it
#: cannot create the threads asked for; 100,000 did).
MAX_THREADS = 256


def check_num_threads(num_threads) -> int:
    """``num_threads`` as an int in 1..:data:`MAX_THREADS`, else ``ValueError``."""
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) \
            or not 1 <= int(num_threads) <= MAX_THREADS:
        raise ValueError(f"num_threads must be an integer from 1 to {MAX_THREADS} "
                         f"(or None for the default); got {num_threads!r}")
    return int(num_threads)
