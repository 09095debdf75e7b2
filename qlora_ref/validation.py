"""Input checks shared by the quantization functions.

Public functions validate here, then call a kernel (NumPy or Cython) that
assumes clean input, the way bitsandbytes' ``functional`` module validates
before calling its ops. Every failure is a ``ValueError`` that names the
problem; nothing reaches a kernel that could crash or return garbage.

Torch tensors are accepted without importing torch: we recognise them by
their type's module and convert through ``.float().numpy()``.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .dtypes import FLOAT_DTYPES

__all__ = ["VALID_BLOCKSIZES", "QUANT_TYPES", "QUANT_BITS", "INITS", "OPTIMIZERS", "DECODERS", "as_float32_flat", "check_blocksize",
           "check_quant_type", "check_positive_int", "check_code", "check_num_threads",
           "MAX_THREADS", "dtype_name", "check_int_range", "check_real", "MAX_MATRIX_ELEMENTS",
           "check_matrix_side", "MAX_LORA_RANK", "MAX_LORA_ALPHA", "check_lora_rank",
           "check_lora_alpha", "check_text", "check_config_bounds", "CONFIG_BOUNDS"]

#: Blocksizes bitsandbytes accepts for 4-bit quantization (powers of two).
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: The 4-bit data types this package implements.
QUANT_TYPES = ("nf4", "fp4", "int4")
#: Storage precisions of the frozen base (``quant_bits``).
QUANT_BITS = (4, 8, 16)
#: How ``lora_A`` and ``lora_B`` can start (``init_lora_weights``).
INITS = ("lora", "gaussian", "loftq")
#: The optimizers fine-tuning can use (``optim``).
OPTIMIZERS = ("paged_adamw", "adamw", "bnb_paged_adamw")
#: The loops a Hugging Face model can decode with: qlora_ref's lean Llama decoder or transformers'.
DECODERS = ("lean", "transformers")



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
        if getattr(x, "is_meta", False) or getattr(x, "layout", None) is not None \
                and str(x.layout) != "torch.strided":
            raise ValueError(f"{what} is a {'meta' if x.is_meta else str(x.layout)} tensor, which "
                             "holds no dense data to quantize")
        shape = tuple(int(s) for s in x.shape)
        wide = x.detach().to("cpu").reshape(-1)
        flat = (wide.double() if name == "float64" else wide.float()).numpy()
    else:
        x = np.asarray(x)
        shape = tuple(x.shape)
        flat = x.reshape(-1)
    if flat.size == 0:
        raise ValueError(f"{what} is empty (shape {shape}); there is nothing to quantize")
    if not np.isfinite(flat).all():
        bad = int(np.count_nonzero(~np.isfinite(flat)))
        raise ValueError(
            f"{what} holds {bad} NaN or infinite value(s); quantization needs finite numbers")
    if flat.dtype == np.float64:  # finite in float64, but perhaps beyond float32's range
        big = float(np.abs(flat).max())
        if big > float(np.finfo(np.float32).max):
            raise ValueError(f"{what} holds values beyond float32's range (max |value| {big:.4g} > "
                             f"{float(np.finfo(np.float32).max):.4g}); the kernels compute in float32")
        flat = flat.astype(np.float32)
    else:
        flat = flat.astype(np.float32, copy=False)
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


def is_int(value) -> bool:
    """Whether ``value`` is an integer (Python's or NumPy's), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_json_number(value, limit: int = 2 ** 53) -> bool:
    """A finite number as JSON gives it (int or float, not bool); integers up to ``limit``.

    A 401-digit integer is refused here: ``math.isfinite`` would overflow on it.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) <= limit if isinstance(value, int) else math.isfinite(value)


def passes(check, value) -> bool:
    """Whether ``check(value)`` accepts ``value`` (raises no ``ValueError``)."""
    try:
        check(value)
    except ValueError:
        return False
    return True


def check_count(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; integral floats such as ``65e9`` are accepted."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if ok and not isinstance(value, numbers.Integral):
        ok = math.isfinite(value) and float(value).is_integer()
    if not ok or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


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


def check_finite_values(array, name: str, low=None, high=None) -> None:
    """Raise ``ValueError`` naming ``name`` if ``array`` holds NaN/inf or leaves [low, high].

    ``low`` bounds the values from below; ``high`` bounds their magnitude
    (``|value| <= high``). Reads every value once: meant for the per-block
    constants and code tables (O(n / blocksize)), not for the data itself.
    """
    array = np.asarray(array)
    if not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise ValueError(f"{name} holds {bad} NaN or infinite value(s)")
    if array.size and low is not None and array.min() < low:
        raise ValueError(f"{name} holds negative values (min {array.min()!r}); "
                         f"they must be >= {low}")
    if array.size and high is not None and np.abs(array).max() > high:
        raise ValueError(f"{name} holds values outside [-{high}, {high}] "
                         f"(max |value| {np.abs(array).max()!r})")


#: The most threads a kernel call may ask for (libgomp aborts the process when it
#: cannot create the threads asked for; 100,000 did).
MAX_THREADS = 256


def check_num_threads(num_threads) -> int:
    """``num_threads`` as an int in 1..:data:`MAX_THREADS`, else ``ValueError``."""
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) \
            or not 1 <= int(num_threads) <= MAX_THREADS:
        raise ValueError(f"num_threads must be a positive integer, at most {MAX_THREADS} "
                         f"(or None for the default); got {num_threads!r}")
    return int(num_threads)


def check_int_range(value, name: str, low: int, high: int) -> int:
    """``value`` as an int in ``low..high``, else ``ValueError`` naming ``name`` and the range.

    Bools, floats (``1e9``, ``2.0``) and strings are refused: a size read from
    a config must be an integer, and the upper bound keeps an allocation or a
    loop from running for minutes before the first useful step.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or not low <= int(value) <= high:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ValueError(f"{name} must be an integer from {low} to {high:,}; got {shown}")
    return int(value)


def check_real(value, name: str, low: float | None = None, high: float | None = None,
               allow_zero: bool = True) -> float:
    """``value`` as a finite float in ``[low, high]``, else ``ValueError`` naming ``name``.

    Safe on anything: a 401-digit integer (whose ``float()`` overflows), NaN,
    infinity, a string or ``None`` all give the same one-line error.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        raise ValueError(f"{name} must be a real number; got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        number = float("inf")
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    if not np.isfinite(number) or (low is not None and number < low) \
            or (high is not None and number > high) or (not allow_zero and number == 0):
        where = f" in [{low:g}, {high:g}]" if low is not None and high is not None else \
            f" >= {low:g}" if low is not None else f" <= {high:g}" if high is not None else ""
        raise ValueError(f"{name} must be a finite number{where}"
                         f"{'' if allow_zero else ', not 0'}; got {shown}")
    return number


#: The most elements of a matrix the CLI's benchmarks build (2**28: 1 GiB of float32).
MAX_MATRIX_ELEMENTS = 2 ** 28


def check_matrix_side(rows: int, cols: int, name: str = "--size") -> tuple[int, int]:
    """``(rows, cols)`` if both are positive and their product is at most :data:`MAX_MATRIX_ELEMENTS`."""
    rows = check_int_range(rows, f"{name} rows", 1, MAX_MATRIX_ELEMENTS)
    cols = check_int_range(cols, f"{name} columns", 1, MAX_MATRIX_ELEMENTS)
    if rows * cols > MAX_MATRIX_ELEMENTS:
        raise ValueError(f"{name} {rows}x{cols} has {rows * cols:,} elements; at most "
                         f"{MAX_MATRIX_ELEMENTS:,} (1 GiB of float32) are allowed")
    return rows, cols


#: The largest LoRA rank accepted (a rank is a matrix side; PEFT's largest published ranks are 256).
MAX_LORA_RANK = 2 ** 16
#: The largest ``|lora_alpha|`` accepted. The update is scaled by alpha / r; beyond this the
#: adapter's output swamps the base's (alpha 1e308 printed garbage and exited 0).
MAX_LORA_ALPHA = 2.0 ** 16


def check_lora_rank(r, name: str = "r") -> int:
    """A LoRA rank: an int in 1..:data:`MAX_LORA_RANK` (``10**400`` and ``4.0`` are refused)."""
    try:
        return check_int_range(r, name, 1, MAX_LORA_RANK)
    except ValueError:
        shown = repr(r) if len(repr(r)) <= 40 else repr(r)[:37] + "..."
        raise ValueError(f"{name} must be a positive integer, at most {MAX_LORA_RANK:,}; "
                         f"got {shown}") from None


def check_lora_alpha(alpha, name: str = "lora_alpha") -> float:
    """A LoRA alpha: a finite real with ``|alpha| <=`` :data:`MAX_LORA_ALPHA` (NaN, 1e308 and a
    401-digit integer are refused with the same one line)."""
    return check_real(alpha, name, -MAX_LORA_ALPHA, MAX_LORA_ALPHA)


def check_text(text, what: str = "text") -> str:
    """``text`` if it is a ``str`` that encodes as UTF-8, else ``ValueError`` naming ``what``.

    A lone surrogate (JSON ``"\\ud800"``, or a non-UTF-8 byte in ``sys.argv``,
    which Python decodes as ``"\\udcff"``) is a ``str`` no tokenizer accepts:
    it raised ``TypeError`` deep inside one.
    """
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode text: a lone surrogate "
                         f"{text[exc.start]!r} at character {exc.start} (a non-UTF-8 byte, or a "
                         "JSON \\ud800-\\udfff escape without its pair)") from None
    return text


#: Upper bounds of a finetune config's sizes and counts (a config file is input too: ``train_size:
#: 1e9`` ran for minutes building examples before the first step). Generous next to the paper's
#: recipes (Alpaca: 52,002 examples, batch 16, 10,000 steps at most).
CONFIG_BOUNDS = {
    "train_size": 10 ** 6, "eval_size": 10 ** 6, "per_device_train_batch_size": 65536,
    "gradient_accumulation_steps": 65536, "logging_steps": 10 ** 7, "save_steps": 10 ** 7,
    "max_steps": 10 ** 7,
}
#: Most epochs (``num_train_epochs``; a float, as in transformers).
MAX_EPOCHS = 10 ** 4


def check_config_bounds(config) -> None:
    """``ValueError`` naming the first size of a finetune config outside its bound.

    Reads the attributes of :data:`CONFIG_BOUNDS` (when ``config`` has them),
    ``r``, ``lora_alpha`` and ``num_train_epochs``; safe on any JSON value
    (a 401-digit ``lora_alpha`` overflowed ``math.isfinite``). Lower bounds
    and types stay with the config's own checks; ``max_steps`` and
    ``save_steps`` may be -1 / 0 as their meanings say.
    """
    for name, high in CONFIG_BOUNDS.items():
        value = getattr(config, name, None)
        if value is None:
            continue
        low = {"max_steps": -1, "save_steps": 0}.get(name, 1)
        check_int_range(value, name, low, high)
    if getattr(config, "r", None) is not None:
        check_lora_rank(config.r)
    if getattr(config, "lora_alpha", None) is not None:
        check_lora_alpha(config.lora_alpha)
    if getattr(config, "num_train_epochs", None) is not None:
        check_real(config.num_train_epochs, "num_train_epochs", 0.0, MAX_EPOCHS)
