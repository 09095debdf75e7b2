"""Interoperability with bitsandbytes: exchange ``QuantState`` objects and checkpoints.

* :func:`to_bitsandbytes` / :func:`from_bitsandbytes` convert between our
  :class:`~qlora_ref.QuantState` and ``(packed, bitsandbytes.functional.QuantState)``,
  the pair ``bitsandbytes.functional.dequantize_4bit`` takes.
* :func:`to_linear4bit_state_dict` / :func:`from_linear4bit_state_dict` write
  and read the state-dict entries of a ``bitsandbytes.nn.Linear4bit``
  (``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
  ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``), so a
  learner can open a real 4-bit checkpoint with this package. These two need
  torch but *not* bitsandbytes.

The packed ``quant_state.bitsandbytes__<type>`` entry is JSON encoded as
UTF-8 bytes in a uint8 tensor (bitsandbytes' ``pack_dict_to_tensor``).
INT4 is not a bitsandbytes type: its entries have the same layout with the
metadata under ``quant_state.qlora_ref__int4`` (bitsandbytes cannot read them).

:func:`is_bitsandbytes_linear4bit` and :func:`from_bitsandbytes_linear4bit`
recognise and read a ``bitsandbytes.nn.Linear4bit`` layer (a model loaded
with transformers' ``BitsAndBytesConfig(load_in_4bit=True)``) without
importing bitsandbytes.

Note (bitsandbytes' CPU repacking, 0.50.2): on a CPU with AVX512-BF16, the
first forward of a ``bitsandbytes.nn.Linear4bit`` in eval mode with an input
that needs no gradient calls ``_convert_weight_packed_for_cpu``: the packed
codes are permuted into tiles of 32 output rows (exactly invertible), and the
absmax are dequantized from their 8-bit double quantization, rounded to
bfloat16 and stored transposed, ``(in / blocksize, out)``; the nested
constants and the offset are dropped (``quant_state.packing_format_for_cpu =
True``). From then on the layer computes with those bfloat16 constants. The
checkpoint's 8-bit constants cannot be recovered from them, so
:func:`from_bitsandbytes` imports what the layer now holds, without
quantizing anything: the codes put back in row order
(:func:`unpack_cpu_tiles`) and the bfloat16 absmax widened to float32
(exact), with no double quantization. The imported layer computes what
bitsandbytes' repacked layer computes. Importing before the first eval-mode
forward keeps the checkpoint's own bytes, double quantization included.
"""
from __future__ import annotations

import json

import numpy as np

from ..codebooks import code_for
from ..quant_state import QuantState

__all__ = ["to_bitsandbytes", "from_bitsandbytes", "to_linear4bit_state_dict",
           "from_linear4bit_state_dict", "is_bitsandbytes_linear4bit",
           "from_bitsandbytes_linear4bit", "unpack_cpu_tiles"]

#: Who names the metadata entry ``<prefix>.quant_state.<owner>__<quant_type>``.
_META_OWNER = {"nf4": "bitsandbytes", "fp4": "bitsandbytes", "int4": "qlora_ref"}


def _torch():
    import torch

    return torch


def _numpy(x, dtype, what: str = "input") -> np.ndarray:
    """A tensor or array as a 1-D NumPy array of ``dtype`` (exact: no value conversion).

    ``what`` names the field in the ``ValueError`` for anything else (None, a list, another dtype).
    """
    if hasattr(x, "detach") and hasattr(x, "numpy"):
        x = x.detach().to("cpu").contiguous()
        if str(x.dtype) != "torch." + np.dtype(dtype).name:
            raise ValueError(f"{what} must be a {np.dtype(dtype).name} tensor, got {x.dtype}")
        return x.numpy().reshape(-1).copy()
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{what} must be a {np.dtype(dtype).name} tensor or array, "
                         f"got {type(x).__name__}")
    if x.dtype != dtype:
        raise ValueError(f"{what} must be a {np.dtype(dtype).name} array, got {x.dtype}")
    return x.reshape(-1).copy()


def _field(obj, name: str, what: str):
    """``obj.name``, or a ``ValueError`` naming ``what.name`` if it is missing or None."""
    value = getattr(obj, name, None)
    if value is None:
        raise ValueError(f"{what}.{name} is missing (None)")
    return value


def _int(value, what: str) -> int:
    """An integer field (a Python/NumPy int or a one-element integer tensor), else ``ValueError``."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1 \
            and not isinstance(value, (int, np.integer)):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return int(value)


def _shape(value, what: str) -> tuple:
    try:
        dims = tuple(value)
    except TypeError:
        raise ValueError(f"{what} must be a sequence of integers, got {value!r}") from None
    return tuple(_int(d, what) for d in dims)


def _offset(value, what: str) -> np.float32:
    if hasattr(value, "item"):
        if getattr(value, "numel", lambda: 1)() != 1:
            raise ValueError(f"{what} must be one number, got {value!r}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return np.float32(value)


def _checked_code(stored, quant_type: str) -> np.ndarray:
    """Our codebook for ``quant_type``, after checking a stored table equals it as numbers.

    bitsandbytes stores FP4's code 0b1000 as +0.0 although its kernels decode
    it as -0.0 (see :func:`qlora_ref.fp4_code`); we keep the kernels' meaning.
    """
    ours = code_for(quant_type)
    stored = _numpy(stored, np.float32, f"the {quant_type} code table")
    if stored.shape != ours.shape or not np.array_equal(stored, ours):
        raise ValueError(f"the stored {quant_type} table differs from the standard one: "
                         f"{stored.tolist()}")
    return ours


def to_bitsandbytes(state: QuantState, device="cpu"):
    """Export ``state`` as ``(packed, quant_state)`` for ``bitsandbytes.functional.dequantize_4bit``.

    ``packed`` is a ``torch.uint8`` tensor of shape ``(ceil(n/2), 1)`` (the
    shape bitsandbytes' ``quantize_4bit`` returns). bitsandbytes dequantizes
    only to 16/32-bit floats, so a state quantized from float64 is exported
    with dtype float32: the dequantized values are the same float32 products.

    Examples
    --------
    >>> import numpy as np, qlora_ref, bitsandbytes.functional as F
    >>> packed, qs = qlora_ref.to_bitsandbytes(qlora_ref.quantize_4bit(np.ones((4, 64), np.float32)))
    >>> F.dequantize_4bit(packed, qs).shape
    torch.Size([4, 64])
    """
    torch = _torch()
    from bitsandbytes.functional import QuantState as BnbQuantState

    if state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes stores only nf4 and fp4, not {state.quant_type!r}")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    state2 = offset = None
    if state.double_quant:
        state2 = BnbQuantState(absmax=t(state.nested_absmax), code=t(state.nested_code),
                               blocksize=state.nested_blocksize, dtype=torch.float32)
        offset = torch.tensor(np.float32(state.offset)).to(device)
    qs = BnbQuantState(absmax=t(state.absmax), shape=torch.Size(state.shape), code=t(state.code),
                       blocksize=state.blocksize, quant_type=state.quant_type,
                       dtype=torch.float32 if state.dtype == "float64" else getattr(torch, state.dtype),
                       offset=offset, state2=state2)
    return t(state.packed).reshape(-1, 1), qs


def from_bitsandbytes(packed, quant_state) -> QuantState:
    """Build a :class:`~qlora_ref.QuantState` from bitsandbytes' ``(packed, QuantState)``.

    Raises ``ValueError`` naming the field for anything that is not what
    ``bitsandbytes.functional.quantize_4bit`` returns: ``quant_state`` None
    or a dict (a serialized state dict goes to :func:`from_linear4bit_state_dict`),
    a missing ``absmax``/``state2``/``offset``, a non-integer blocksize, a
    tensor of the wrong dtype.
    """
    if quant_state is None or isinstance(quant_state, dict) or not hasattr(quant_state, "quant_type"):
        raise ValueError(f"quant_state must be a bitsandbytes.functional.QuantState, got "
                         f"{type(quant_state).__name__} (for Linear4bit state-dict entries use "
                         f"from_linear4bit_state_dict)")
    if getattr(quant_state, "packing_format_for_cpu", False):
        return _from_cpu_tiles(packed, quant_state)
    quant_type = quant_state.quant_type
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"unsupported bitsandbytes quant_type {quant_type!r}")
    if not hasattr(packed, "dtype"):
        raise ValueError(f"packed must be a uint8 tensor, got {type(packed).__name__}")
    if hasattr(packed, "view") and hasattr(packed, "detach") and str(packed.dtype) != "torch.uint8":
        packed = packed.view(_torch().uint8)  # bitsandbytes may store in another quant_storage
    kwargs = dict(packed=_numpy(packed, np.uint8, "packed"),
                  shape=_shape(_field(quant_state, "shape", "quant_state"), "quant_state.shape"),
                  dtype=str(_field(quant_state, "dtype", "quant_state")).replace("torch.", ""),
                  blocksize=_int(_field(quant_state, "blocksize", "quant_state"),
                                 "quant_state.blocksize"),
                  quant_type=quant_type,
                  code=_checked_code(_field(quant_state, "code", "quant_state"), quant_type))
    absmax = _field(quant_state, "absmax", "quant_state")
    if getattr(quant_state, "nested", False):
        state2 = _field(quant_state, "state2", "quant_state")
        kwargs.update(absmax=_numpy(absmax, np.uint8, "quant_state.absmax"),
                      nested_absmax=_numpy(_field(state2, "absmax", "quant_state.state2"),
                                           np.float32, "quant_state.state2.absmax"),
                      nested_code=_numpy(_field(state2, "code", "quant_state.state2"),
                                         np.float32, "quant_state.state2.code"),
                      offset=_offset(_field(quant_state, "offset", "quant_state"),
                                     "quant_state.offset"),
                      nested_blocksize=_int(_field(state2, "blocksize", "quant_state.state2"),
                                            "quant_state.state2.blocksize"))
    else:
        kwargs.update(absmax=_numpy(absmax, np.float32, "quant_state.absmax"))
    return QuantState(**kwargs)


def to_linear4bit_state_dict(state: QuantState, prefix: str = "weight") -> dict:
    """The state-dict entries a ``bitsandbytes.nn.Linear4bit`` saves for its weight.

    Returns a dict of torch tensors keyed ``prefix``, ``prefix.absmax``,
    ``prefix.quant_map`` and, with double quantization, ``prefix.nested_absmax``,
    ``prefix.nested_quant_map``; plus ``prefix.quant_state.bitsandbytes__<type>``
    holding the JSON metadata (``prefix.quant_state.qlora_ref__int4`` for INT4,
    which bitsandbytes does not have).
    """
    torch = _torch()
    if state.quant_type not in _META_OWNER:
        raise ValueError(f"Linear4bit stores only {tuple(_META_OWNER)}, not {state.quant_type!r}")
    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731 (copies: the dict owns its tensors)
    meta = {"quant_type": state.quant_type, "blocksize": state.blocksize,
            "dtype": state.dtype, "shape": list(state.shape)}
    out = {prefix: t(state.packed).reshape(-1, 1), f"{prefix}.absmax": t(state.absmax),
           f"{prefix}.quant_map": t(state.code)}
    if state.double_quant:
        out[f"{prefix}.nested_absmax"] = t(state.nested_absmax)
        out[f"{prefix}.nested_quant_map"] = t(state.nested_code)
        meta.update(nested_blocksize=state.nested_blocksize, nested_dtype="float32",
                    nested_offset=float(np.float32(state.offset)))
    payload = json.dumps(meta).encode("utf-8")
    owner = _META_OWNER[state.quant_type]
    out[f"{prefix}.quant_state.{owner}__{state.quant_type}"] = torch.tensor(
        list(payload), dtype=torch.uint8)
    return out


def linear4bit_state_dict_keys(state_dict, prefix: str = "weight") -> list:
    """The keys of ``state_dict`` that belong to the Linear4bit weight at ``prefix``."""
    return [k for k in state_dict if isinstance(k, str)
            and (k == prefix or k.startswith(prefix + ".") and k[len(prefix) + 1:] in (
                "absmax", "quant_map", "nested_absmax", "nested_quant_map")
                or k.startswith(f"{prefix}.quant_state."))]


def from_linear4bit_state_dict(state_dict: dict, prefix: str = "weight") -> QuantState:
    """Read a Linear4bit weight from its state-dict entries (torch tensors or NumPy arrays).

    Raises ``ValueError`` naming the missing key if an entry is absent.
    """
    if not isinstance(state_dict, dict):
        raise ValueError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    meta_keys = [k for k in state_dict if isinstance(k, str) and any(
        k == f"{prefix}.quant_state.{owner}__{t}" for t, owner in _META_OWNER.items())]
    if len(meta_keys) != 1:
        raise ValueError(f"expected one '{prefix}.quant_state.bitsandbytes__<nf4|fp4>' "
                         f"(or qlora_ref__int4) entry, found {meta_keys or 'none'} among "
                         f"{sorted(map(str, state_dict))}")
    try:
        meta = json.loads(bytes(_numpy(state_dict[meta_keys[0]], np.uint8, meta_keys[0]))
                          .decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{meta_keys[0]} does not hold JSON metadata: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_keys[0]} must hold a JSON object, got {type(meta).__name__}")
    missing = [k for k in ("quant_type", "blocksize", "dtype", "shape") if k not in meta]
    if "nested_offset" in meta:
        missing += [k for k in ("nested_blocksize",) if k not in meta]
    if missing:
        raise ValueError(f"{meta_keys[0]} lacks {missing}")

    def entry(name, dtype):
        key = f"{prefix}.{name}" if name else prefix
        if key not in state_dict:
            raise ValueError(f"Linear4bit state dict lacks '{key}'")
        return _numpy(state_dict[key], dtype, key)

    where = f"{meta_keys[0]}:"
    if not meta_keys[0].endswith(f"__{meta['quant_type']}"):
        raise ValueError(f"{where} quant_type {meta['quant_type']!r} differs from the key's")
    kwargs = dict(packed=entry("", np.uint8), shape=_shape(meta["shape"], f"{where} shape"),
                  dtype=meta["dtype"], blocksize=_int(meta["blocksize"], f"{where} blocksize"),
                  quant_type=meta["quant_type"],
                  code=_checked_code(entry("quant_map", np.float32), meta["quant_type"]))
    if "nested_offset" in meta:
        kwargs.update(absmax=entry("absmax", np.uint8),
                      nested_absmax=entry("nested_absmax", np.float32),
                      nested_code=entry("nested_quant_map", np.float32),
                      offset=_offset(meta["nested_offset"], f"{where} nested_offset"),
                      nested_blocksize=_int(meta["nested_blocksize"], f"{where} nested_blocksize"))
    else:
        kwargs.update(absmax=entry("absmax", np.float32))
    return QuantState(**kwargs)


def is_bitsandbytes_linear4bit(module) -> bool:
    """Whether ``module`` is a ``bitsandbytes.nn.Linear4bit`` (or a subclass: ``LinearNF4``, ...).

    Decided from the class hierarchy's names, so bitsandbytes is not imported
    for a model that has none of its layers.
    """
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes")
               for c in type(module).__mro__)


#: Output rows per tile of bitsandbytes' CPU packing (``block_n`` of ``_convert_weight_packed_for_cpu``).
CPU_TILE_ROWS = 32


def unpack_cpu_tiles(tiled: np.ndarray, out_features: int, in_features: int) -> np.ndarray:
    """Undo bitsandbytes' CPU tiling of 4-bit codes: ``(out, in / 2)`` tiled bytes -> ``(out, in)`` codes.

    The tiling (bitsandbytes 0.50.2, ``_convert_weight_packed_for_cpu``):
    codes ``q[n, k]`` are grouped by tiles of :data:`CPU_TILE_ROWS` output
    rows ``n`` and by pairs of inputs ``(2j, 2j + 1)``, ordered
    ``[tile, j, row in tile, pair member]``, and every 64 codes in that order
    are stored as 32 bytes whose low nibbles are the first 32 codes and high
    nibbles the last 32.
    """
    if out_features % CPU_TILE_ROWS or in_features % 2:
        raise ValueError(f"a CPU-tiled bitsandbytes weight needs out_features divisible by "
                         f"{CPU_TILE_ROWS} and an even in_features, got ({out_features}, {in_features})")
    tiled = np.asarray(tiled, np.uint8).reshape(-1, 32)                         # (groups, 32 bytes)
    if tiled.size * 2 != out_features * in_features:
        raise ValueError(f"the tiled weight has {tiled.size} bytes; ({out_features}, "
                         f"{in_features}) codes need {out_features * in_features // 2}")
    ordered = np.concatenate([tiled & 15, tiled >> 4], axis=1)               # (groups, 64 codes)
    ordered = ordered.reshape(out_features // CPU_TILE_ROWS, in_features // 2, CPU_TILE_ROWS, 2)
    return ordered.transpose(0, 2, 1, 3).reshape(out_features, in_features)  # q[n, k]


def _from_cpu_tiles(packed, quant_state) -> QuantState:
    """The QuantState of a layer bitsandbytes repacked for its CPU kernel (see the module note)."""
    shape = _shape(_field(quant_state, "shape", "quant_state"), "quant_state.shape")
    if len(shape) != 2:
        raise ValueError(f"a CPU-tiled bitsandbytes weight must be 2-D, got shape {shape}")
    out_features, in_features = shape
    blocksize = _int(_field(quant_state, "blocksize", "quant_state"), "quant_state.blocksize")
    quant_type = quant_state.quant_type
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"unsupported bitsandbytes quant_type {quant_type!r}")
    codes = unpack_cpu_tiles(_numpy(packed, np.uint8, "packed"), out_features, in_features)
    flat = codes.reshape(-1)
    standard = (flat[0::2] << 4) | flat[1::2]           # the first code of a pair in the high nibble
    absmax = _field(quant_state, "absmax", "quant_state")   # bfloat16, (in / blocksize, out)
    if str(getattr(absmax, "dtype", "")) != "torch.bfloat16" or tuple(absmax.shape) != (
            in_features // blocksize, out_features):
        raise ValueError(f"a CPU-tiled bitsandbytes quant_state must hold bfloat16 absmax of "
                         f"shape ({in_features // blocksize}, {out_features}), got "
                         f"{getattr(absmax, 'dtype', None)} {tuple(getattr(absmax, 'shape', ()))}")
    widened = absmax.detach().to("cpu").float().T.contiguous().numpy().reshape(-1)  # exact
    dtype = getattr(quant_state, "original_dtype", None) or _field(quant_state, "dtype", "quant_state")
    return QuantState(packed=standard.astype(np.uint8), absmax=widened.astype(np.float32),
                      shape=shape, dtype=str(dtype).replace("torch.", ""), blocksize=blocksize,
                      quant_type=quant_type,
                      code=_checked_code(_field(quant_state, "code", "quant_state"), quant_type))


def from_bitsandbytes_linear4bit(module) -> QuantState:
    """The :class:`~qlora_ref.QuantState` of a ``bitsandbytes.nn.Linear4bit``'s weight, bytes unchanged.

    Reads ``module.weight`` (the packed ``Params4bit``) and its ``quant_state``
    with :func:`from_bitsandbytes`; the shape must be the layer's
    ``(out_features, in_features)``.

    Raises
    ------
    ValueError
        If the layer was never quantized (no ``quant_state``: still on the
        meta device, or not yet moved to a device). A layer bitsandbytes
        repacked for its CPU kernel is read as it now computes (see the module note).
    """
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        raise ValueError(f"bitsandbytes {name}(in_features={module.in_features}, "
                         f"out_features={module.out_features}) has no quant_state: it is not "
                         "quantized yet (bitsandbytes quantizes when the layer is moved to a device)")
    state = from_bitsandbytes(weight.data, quant_state)
    if state.shape != (module.out_features, module.in_features):
        raise ValueError(f"bitsandbytes {name}: quant_state.shape {state.shape} is not "
                         f"(out_features, in_features) = ({module.out_features}, "
                         f"{module.in_features})")
    return state
