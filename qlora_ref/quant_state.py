"""``QuantState``: everything needed to turn 4-bit bytes back into numbers.

Mirrors ``bitsandbytes.functional.QuantState`` (a packed tensor plus its
constants), as a plain dataclass of NumPy arrays with exact round-trips to
a dict and to one ``.npz`` file.

Layout (n elements, blocksize B, nested blocksize 256)::

    packed          uint8   (ceil(n / 2),)        two 4-bit codes per byte
    absmax          float32 (ceil(n / B),)        without double quantization
                    uint8   (ceil(n / B),)        with it: 8-bit codes of absmax - offset
    nested_absmax   float32 (ceil(n_blocks / 256),)   only with double quantization
    offset          float32 scalar                    only with double quantization
    code            float32 (16,)                 the 4-bit codebook (shared constant)
    nested_code     float32 (256,)                the dynamic 8-bit codebook (shared constant)
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import numpy as np

from .validation import QUANT_TYPES, VALID_BLOCKSIZES

__all__ = ["QuantState"]

_ARRAYS = ("packed", "absmax", "code", "nested_absmax", "nested_code")


@dataclasses.dataclass(eq=False)
class QuantState:
    """A tensor quantized to 4 bits, blockwise, optionally with double quantization.

    Attributes
    ----------
    packed : numpy.ndarray
        uint8, ``ceil(n / 2)`` bytes; element ``2i`` in the high nibble.
    absmax : numpy.ndarray
        First-level constants: float32 per block, or their uint8 codes when
        ``double_quant``.
    shape : tuple of int
        Shape of the original tensor.
    dtype : str
        dtype name of the original tensor (``"float32"``, ``"bfloat16"``, ...).
    blocksize : int
        Elements per block.
    quant_type : str
        ``"nf4"``, ``"fp4"`` or ``"int4"``.
    code : numpy.ndarray
        The 16-value codebook the codes index.
    nested_absmax, nested_code, offset, nested_blocksize
        Second level, present only with double quantization.
    """

    packed: np.ndarray
    absmax: np.ndarray
    shape: tuple
    dtype: str
    blocksize: int
    quant_type: str
    code: np.ndarray
    nested_absmax: Optional[np.ndarray] = None
    nested_code: Optional[np.ndarray] = None
    offset: Optional[float] = None
    nested_blocksize: Optional[int] = None

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        self.validate()

    # -- sizes ---------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        """True if the absmax constants are themselves quantized."""
        return self.nested_absmax is not None

    @property
    def n_elements(self) -> int:
        """Number of quantized values, ``prod(shape)``."""
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        """Number of first-level blocks, ``ceil(n / blocksize)``."""
        return -(-self.n_elements // self.blocksize)

    @property
    def nbytes(self) -> int:
        """Bytes stored per tensor: packed codes, constants and offset.

        The codebooks are shared by every tensor of a model and are not
        counted, as in the paper's accounting.
        """
        total = self.packed.nbytes + self.absmax.nbytes
        if self.double_quant:
            total += self.nested_absmax.nbytes + 4  # + the float32 offset
        return int(total)

    @property
    def bits_per_param(self) -> float:
        """``8 * nbytes / n``: 4.5 at blocksize 64, about 4.127 with double quantization."""
        return 8.0 * self.nbytes / self.n_elements

    # -- checks --------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` if any array length disagrees with ``shape`` and ``blocksize``."""
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"QuantState.quant_type must be one of {QUANT_TYPES}, "
                             f"got {self.quant_type!r}")
        if self.blocksize not in VALID_BLOCKSIZES:
            raise ValueError(f"QuantState.blocksize must be one of {VALID_BLOCKSIZES}, "
                             f"got {self.blocksize!r}")
        n = self.n_elements
        if n == 0:
            raise ValueError(f"QuantState.shape {self.shape} has no elements")
        expect = {"packed": ((n + 1) // 2, np.uint8),
                  "absmax": (self.n_blocks, np.uint8 if self.double_quant else np.float32),
                  "code": (16, np.float32)}
        if self.double_quant:
            if self.offset is None or self.nested_code is None or not self.nested_blocksize:
                raise ValueError("QuantState with nested_absmax also needs offset, nested_code "
                                 "and nested_blocksize")
            expect["nested_absmax"] = (-(-self.n_blocks // self.nested_blocksize), np.float32)
            expect["nested_code"] = (256, np.float32)
        for name, (length, dtype) in expect.items():
            array = getattr(self, name)
            if not isinstance(array, np.ndarray) or array.ndim != 1:
                raise ValueError(f"QuantState.{name} must be a 1-D NumPy array")
            if array.size != length or array.dtype != dtype:
                raise ValueError(
                    f"QuantState.{name} has {array.size} values of {array.dtype}, but shape "
                    f"{self.shape} with blocksize {self.blocksize} needs {length} of "
                    f"{np.dtype(dtype).name}")

    # -- round trips ---------------------------------------------------------
    def to_dict(self) -> dict:
        """A dict of NumPy arrays and plain values; ``QuantState.from_dict`` inverts it."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["shape"] = list(self.shape)
        if self.offset is not None:
            out["offset"] = np.float32(self.offset)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "QuantState":
        """Build from :meth:`to_dict` output (missing optional keys mean no double quantization)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown QuantState keys: {sorted(unknown)}")
        kwargs = dict(d)
        for key in ("blocksize", "nested_blocksize"):
            if kwargs.get(key) is not None:
                kwargs[key] = int(kwargs[key])
        for key in ("dtype", "quant_type"):
            if key in kwargs:
                kwargs[key] = str(kwargs[key])
        if kwargs.get("offset") is not None:
            kwargs["offset"] = np.float32(kwargs["offset"])
        return cls(**kwargs)

    def save(self, path: str | os.PathLike) -> None:
        """Write every field to one ``.npz`` file; :meth:`load` gives back equal bytes."""
        arrays = {}
        for key, value in self.to_dict().items():
            if value is None:
                continue
            arrays[key] = np.asarray(value)
        with open(path, "wb") as f:  # a file object stops np.savez from appending ".npz"
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QuantState":
        """Read a file written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as data:
            d = {key: data[key] for key in data.files}
        for key in ("blocksize", "nested_blocksize", "dtype", "quant_type", "offset"):
            if key in d:
                d[key] = d[key][()]
        d["shape"] = tuple(int(s) for s in d["shape"])
        return cls.from_dict(d)

    def equals(self, other: "QuantState") -> bool:
        """True if both states hold identical bytes and metadata."""
        a, b = self.to_dict(), other.to_dict()
        for key in a:
            x, y = a[key], b[key]
            if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
                if x is None or y is None or not np.array_equal(np.asarray(x).view(np.uint8),
                                                                np.asarray(y).view(np.uint8)):
                    return False
            elif isinstance(x, np.floating) or isinstance(y, np.floating):
                if x is None or y is None or np.float32(x).tobytes() != np.float32(y).tobytes():
                    return False
            elif x != y:
                return False
        return True

    def __repr__(self) -> str:
        dq = f", double_quant (nested blocksize {self.nested_blocksize})" if self.double_quant else ""
        return (f"QuantState({self.quant_type}, shape={self.shape}, dtype={self.dtype}, "
                f"blocksize={self.blocksize}{dq}, {self.nbytes} bytes, "
                f"{self.bits_per_param:.3f} bits/param)")
