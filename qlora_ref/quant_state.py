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

Note (hostile states): :meth:`QuantState.validate` runs on construction and
on every dequantization. Besides the lengths it checks the values a kernel
would turn into garbage -- NaN/inf or negative constants, a code table
outside [-1, 1] -- in O(n_blocks) work, never O(n). :meth:`QuantState.load`
checks every ``.npy`` header of the ``.npz`` against the metadata before
it reads an array (see its docstring).
"""
from __future__ import annotations

import dataclasses
import math
import os
import zipfile
import zlib
from typing import Optional

import numpy as np

from ._atomic import atomic_file, open_regular_file
from .dtypes import FLOAT_DTYPES
from .validation import QUANT_TYPES, VALID_BLOCKSIZES, check_finite_values, is_int

__all__ = ["QuantState"]

#: metadata members of a state file: (allowed dtype kinds, most values)
_META = {"shape": ("iu", 32), "blocksize": ("iu", 1), "nested_blocksize": ("iu", 1),
         "dtype": ("U", 1), "quant_type": ("U", 1), "offset": ("f", 1)}


def _shape_tuple(shape) -> tuple:
    """``shape`` as a tuple of non-negative ints, or a ``ValueError`` naming it."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"QuantState.shape must be a sequence of integers, got {shape!r}") from None
    if not all(is_int(s) and s >= 0 for s in dims):
        raise ValueError(f"QuantState.shape must hold non-negative integers, got {shape!r}")
    return tuple(int(s) for s in dims)


def _layout(shape: tuple, blocksize: int, double_quant: bool, nested_blocksize) -> dict:
    """What each array must be for this metadata: ``{name: (length, dtype)}``."""
    n = math.prod(shape)
    n_blocks = -(-n // blocksize)
    out = {"packed": ((n + 1) // 2, np.uint8),
           "absmax": (n_blocks, np.uint8 if double_quant else np.float32),
           "code": (16, np.float32)}
    if double_quant:
        out["nested_absmax"] = (-(-n_blocks // nested_blocksize), np.float32)
        out["nested_code"] = (256, np.float32)
    return out


def _check_values(name: str, array: np.ndarray, low=None, high=None) -> None:
    """:func:`~qlora_ref.validation.check_finite_values` with the field named ``QuantState.name``."""
    check_finite_values(array, f"QuantState.{name}", low=low, high=high)


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
        self.shape = _shape_tuple(self.shape)
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
        """Raise ``ValueError`` naming the field if the state is inconsistent or holds bad values.

        Checked: the metadata (quant type, blocksize, dtype, nested blocksize
        a positive int); every array's length and dtype against ``shape`` and
        ``blocksize``; float32 ``absmax`` (single level) finite and >= 0;
        ``nested_absmax`` finite and >= 0; ``offset`` finite; both code tables
        finite and within [-1, 1]. The value checks read only the constants
        (O(n_blocks)), not the packed codes, so this stays cheap next to a
        dequantization, which calls it.
        """
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"QuantState.quant_type must be one of {QUANT_TYPES}, "
                             f"got {self.quant_type!r}")
        if not is_int(self.blocksize) or self.blocksize not in VALID_BLOCKSIZES:
            raise ValueError(f"QuantState.blocksize must be one of {VALID_BLOCKSIZES}, "
                             f"got {self.blocksize!r}")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"QuantState.dtype must be one of {FLOAT_DTYPES}, got {self.dtype!r}")
        shape = _shape_tuple(self.shape)
        if math.prod(shape) == 0:
            raise ValueError(f"QuantState.shape {self.shape} has no elements")
        if self.double_quant:
            if self.offset is None or self.nested_code is None or self.nested_blocksize is None:
                raise ValueError("QuantState with nested_absmax also needs offset, nested_code "
                                 "and nested_blocksize")
            if not is_int(self.nested_blocksize) or self.nested_blocksize < 1:
                raise ValueError(f"QuantState.nested_blocksize must be a positive integer, "
                                 f"got {self.nested_blocksize!r}")
        for name, (length, dtype) in _layout(shape, int(self.blocksize), self.double_quant,
                                             self.nested_blocksize).items():
            array = getattr(self, name)
            if not isinstance(array, np.ndarray) or array.ndim != 1:
                raise ValueError(f"QuantState.{name} must be a 1-D NumPy array")
            if array.size != length or array.dtype != dtype:
                raise ValueError(
                    f"QuantState.{name} has {array.size} values of {array.dtype}, but shape "
                    f"{self.shape} with blocksize {self.blocksize} needs {length} of "
                    f"{np.dtype(dtype).name}")
        # the values: a NaN or negative constant, or a code outside [-1, 1], would
        # dequantize to NaN or to numbers of the wrong sign without any error
        _check_values("code", self.code, high=1.0)
        if self.double_quant:
            offset = np.asarray(self.offset)
            if offset.size != 1 or offset.dtype.kind not in "fiu":
                raise ValueError(f"QuantState.offset must be one real number, got {self.offset!r}")
            with np.errstate(over="ignore"):  # the kernels read it as float32: 1e39 is inf there
                offset32 = offset.astype(np.float32).reshape(())
            if not np.isfinite(offset32):
                raise ValueError(f"QuantState.offset must be finite in float32, got {self.offset!r}")
            _check_values("nested_absmax", self.nested_absmax, low=0.0)
            _check_values("nested_code", self.nested_code, high=1.0)
            # a block's constant is nested_code[c] * nested_absmax[j] + offset in float32, with
            # |nested_code| <= 1: it can overflow only if max(nested_absmax) + |offset| comes
            # near float32's largest value; only then compute them all (O(n_blocks), as the kernel)
            from .double_quant import double_dequantize

            bound = float(self.nested_absmax.max(initial=0.0)) + abs(float(offset32))
            if bound >= float(np.finfo(np.float32).max) / 2:
                with np.errstate(over="ignore"):
                    constants = double_dequantize(self.absmax, self.nested_absmax, offset32,
                                                  int(self.nested_blocksize), self.nested_code)
                if not np.isfinite(constants).all():
                    raise ValueError(
                        f"QuantState: {int(np.count_nonzero(~np.isfinite(constants)))} block "
                        f"constant(s) overflow float32 (nested_absmax up to "
                        f"{float(self.nested_absmax.max()):.4g}, offset {float(offset32):.4g});"
                        " they would dequantize to infinity")
        else:
            _check_values("absmax", self.absmax, low=0.0)

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
        if not isinstance(d, dict):
            raise ValueError(f"QuantState.from_dict expects a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown QuantState keys: {sorted(map(str, unknown))}")
        missing = sorted(n for n in ("packed", "absmax", "shape", "dtype", "blocksize",
                                     "quant_type", "code") if d.get(n) is None)
        if missing:
            raise ValueError(f"QuantState.from_dict: missing keys {missing}")
        kwargs = dict(d)
        for key in ("blocksize", "nested_blocksize"):
            value = kwargs.get(key)
            if isinstance(value, np.ndarray) and value.ndim == 0:
                value = value[()]
            if value is not None:
                if not is_int(value):
                    raise ValueError(f"QuantState.{key} must be an integer, got {value!r}")
                kwargs[key] = int(value)
        for key in ("dtype", "quant_type"):
            if not isinstance(kwargs[key], (str, np.str_)):
                raise ValueError(f"QuantState.{key} must be a string, got {kwargs[key]!r}")
            kwargs[key] = str(kwargs[key])
        if kwargs.get("offset") is not None:
            offset = np.asarray(kwargs["offset"])
            if offset.size != 1 or offset.dtype.kind not in "fiu":
                raise ValueError(f"QuantState.offset must be one real number, got {kwargs['offset']!r}")
            with np.errstate(over="ignore"):  # an overflow becomes inf, which validate() names
                kwargs["offset"] = np.float32(offset.reshape(()))
        return cls(**kwargs)

    def save(self, path: str | os.PathLike) -> None:
        """Write every field to one ``.npz`` file; :meth:`load` gives back equal bytes.

        Written atomically (:func:`qlora_ref._atomic.atomic_file`): a kill or a
        full disk leaves the previous file whole, never a torn one.
        """
        arrays = {}
        for key, value in self.to_dict().items():
            if value is None:
                continue
            arrays[key] = np.asarray(value, dtype=np.int64) if key == "shape" else np.asarray(value)
        with atomic_file(path) as f:  # a file object stops np.savez from appending ".npz"
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QuantState":
        """Read a file written by :meth:`save`.

        Note (hostile files): an ``.npz`` is a zip of ``.npy`` members, and a
        member's header may claim any shape; ``np.load`` allocates what it
        claims before reading. Here every header is read and checked first:
        the metadata members must be scalars (``shape``: at most 32
        integers), each array's shape and dtype must be what ``shape`` and
        ``blocksize`` imply (:meth:`validate`'s rule), and the bytes a header
        claims must equal the zip entry's declared uncompressed size, which
        must lie within the file. Only then are the arrays read, so the
        largest allocation is the one the metadata implies: ``ceil(n/2)``
        packed bytes plus the constants. Nothing is unpickled.

        Raises
        ------
        ValueError
            Naming the member and what it claims, for anything inconsistent;
            or one line for a path that is not a regular file (a FIFO, a
            device such as ``/dev/zero``, a folder), which is never opened
            for a blocking read.
        """
        path = os.fspath(path)
        with open_regular_file(path, "QuantState file") as f:
            try:
                archive = zipfile.ZipFile(f)
            except zipfile.BadZipFile as exc:
                raise ValueError(f"{path} is not a QuantState .npz file: {exc}") from None
            with archive:
                return cls.from_dict(_read_npz(archive, path, os.fstat(f.fileno()).st_size))

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


# ----------------------------------------------------------------------------- reading .npz

#: What reading a crafted zip member raises besides ``ValueError``: a corrupt deflate
#: stream (``zlib.error``), the encrypted flag (``RuntimeError``), an unknown method
#: (``NotImplementedError``), a bad CRC (``BadZipFile``), a short member (``EOFError``).
_ZIP_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError, zlib.error,
               RuntimeError, NotImplementedError)


def _npy_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str, file_size: int):
    """``(shape, dtype, data offset)`` from a member's ``.npy`` header, checked against the zip entry."""
    from numpy.lib import format as npy

    where = f"{path}: member {info.filename!r}"
    if info.file_size > file_size or info.compress_size > file_size:
        # the uncompressed size, as promised: a 220 KB deflate bomb claimed 225 MB
        raise ValueError(f"{where} claims {info.file_size} bytes ({info.compress_size} compressed), "
                         f"more than the {file_size}-byte file holds (a QuantState file is written "
                         "uncompressed)")
    if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ValueError(f"{where} is {'encrypted' if info.flag_bits & 0x1 else 'compressed with method '}"
                         f"{'' if info.flag_bits & 0x1 else info.compress_type}; a QuantState file "
                         "is stored (np.savez) or deflated")
    try:
        with archive.open(info) as f:
            version = npy.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = npy.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = npy.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            data_start = f.tell()
    except _ZIP_ERRORS as exc:
        raise ValueError(f"{where} is not a readable .npy array: {exc}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"{where} claims a negative shape {shape}")
    if dtype.hasobject or dtype.kind not in "biufU" or len(shape) > 1 and fortran:
        raise ValueError(f"{where} holds dtype {dtype}{' (Fortran order)' if fortran else ''}; "
                         "a QuantState file holds plain numbers and strings only")
    nbytes = math.prod(shape) * dtype.itemsize
    if data_start + nbytes != info.file_size:
        raise ValueError(f"{where} claims shape {shape} of {dtype} ({nbytes} bytes), but the zip "
                         f"entry holds {info.file_size - data_start} bytes of data")
    return shape, dtype, data_start


def _read_member(archive, info, header) -> np.ndarray:
    """The array of one member whose header :func:`_npy_header` checked (bounded read)."""
    shape, dtype, data_start = header
    nbytes = math.prod(shape) * dtype.itemsize
    try:
        with archive.open(info) as f:
            f.read(data_start)
            data = f.read(nbytes)
    except _ZIP_ERRORS as exc:  # a corrupt deflate stream is a zlib.error
        raise ValueError(f"member {info.filename!r} is not readable: {exc}") from None
    if len(data) != nbytes:
        raise ValueError(f"member {info.filename!r} is truncated: {len(data)} of {nbytes} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def _read_npz(archive: zipfile.ZipFile, path: str, file_size: int) -> dict:
    """The :meth:`QuantState.to_dict` content of a state file, headers checked before any read."""
    names = {f.name for f in dataclasses.fields(QuantState)}
    members = {}
    for info in archive.infolist():
        key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        if key not in names or key in members:
            raise ValueError(f"{path}: unexpected member {info.filename!r} "
                             f"(a QuantState file holds {', '.join(sorted(names))})")
        members[key] = info
    headers = {key: _npy_header(archive, info, path, file_size) for key, info in members.items()}

    d = {}
    for key in members.keys() & _META.keys():          # small by the check, so read first
        (shape, dtype, _), (kinds, most) = headers[key], _META[key]
        if key == "shape" and shape == (0,):
            kinds += "f"  # np.savez of [] (a 0-d tensor's shape) stores float64
        if dtype.kind not in kinds or len(shape) > (key == "shape") or math.prod(shape) > most \
                or dtype.itemsize > 256:
            raise ValueError(f"{path}: member {key!r} claims shape {shape} of {dtype}; "
                             f"expected {'a short list of integers' if key == 'shape' else 'one value'}")
        value = _read_member(archive, members[key], headers[key])
        d[key] = value if key == "shape" else value.item()  # a Python int, str or float
    for key in ("shape", "blocksize", "dtype", "quant_type"):
        if key not in d:
            raise ValueError(f"{path}: member {key!r} is missing; is it a QuantState file?")
    shape = _shape_tuple(d["shape"].tolist())
    d["shape"] = shape
    blocksize, nested_bs = d["blocksize"], d.get("nested_blocksize")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"{path}: blocksize {blocksize!r} is not one of {VALID_BLOCKSIZES}")
    double_quant = "nested_absmax" in members
    if double_quant and (nested_bs is None or nested_bs < 1):
        raise ValueError(f"{path}: double quantized, but nested_blocksize is {nested_bs!r}")

    for key, (length, dtype) in _layout(shape, int(blocksize), double_quant, nested_bs).items():
        if key not in members:
            raise ValueError(f"{path}: member {key!r} is missing")
        claimed_shape, claimed_dtype, _ = headers[key]
        if claimed_shape != (length,) or claimed_dtype != np.dtype(dtype):
            raise ValueError(f"{path}: member {key!r} claims shape {claimed_shape} of "
                             f"{claimed_dtype}, but shape {shape} with blocksize {blocksize} "
                             f"needs ({length},) of {np.dtype(dtype).name}")
        d[key] = _read_member(archive, members[key], headers[key])
    extra = members.keys() - d.keys()
    if extra:
        raise ValueError(f"{path}: unexpected members {sorted(extra)} for this layout")
    return d
