r"""Adapters on disk in PEFT's format: ``save_adapter`` and ``load_adapter``.

What QLoRA fine-tuning produces is only the adapters,
:math:`\{(\mathbf A_\ell, \mathbf B_\ell)\}` and the scaling
:math:`s = \alpha / r` (a few MB, against GB for the base). Saved in PEFT's
layout, the rest of the ecosystem opens them
(``peft.PeftModel.from_pretrained``, ``transformers``' ``load_adapter``,
serving stacks), and adapters trained with PEFT load here::

    directory/
        adapter_config.json            {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                        "target_modules": [<module paths>], ...}
        adapter_model.safetensors      base_model.model.<module path>.lora_A.weight  (r, in)
                                       base_model.model.<module path>.lora_B.weight  (out, r)

Mirrors ``peft.PeftModel.save_pretrained`` / ``from_pretrained`` for LoRA
(``get_peft_model_state_dict`` strips the adapter name ``default`` from the
keys; ``rank_pattern`` / ``alpha_pattern`` hold per-layer exceptions).
``target_modules`` is written as the full module paths, which PEFT matches
exactly (it does the same for ``"all-linear"``).

``task_type`` is inferred from the ``transformers`` class (``CAUSAL_LM`` for
a ``...ForCausalLM``, and so on) and ``base_model_name_or_path`` from the
model's ``name_or_path``, so ``peft.AutoPeftModelForCausalLM.from_pretrained(directory)``
opens the adapter with its base.

Note (the base is recorded): the adapters were trained against one base,
NF4 with its quantization error, say. :func:`save_adapter` records that
base's format in the metadata of ``adapter_model.safetensors`` under
``"qlora_ref.base"`` (PEFT does not read it), e.g.
``{"quant_bits": 4, "quant_type": "nf4", "blocksize": 64, "double_quant": true,
"compute_dtype": null}``, and :func:`load_adapter` rebuilds that base by
default, so the loaded model computes what the saved one did. An adapter
saved by PEFT has no record and gets a 16-bit base unless told otherwise.

Note (fan_in_fan_out): GPT-2's layers are ``transformers`` ``Conv1D``
(weight ``(in, out)``); PEFT marks their adapters ``fan_in_fan_out: true``
(the tensors keep the shapes ``(r, in)``, ``(out, r)``). We write it true
exactly when some adapted layer wraps a ``Conv1D``, and on load refuse a
flag that disagrees with that rule for the model's layers. A model mixing
``Conv1D`` and ``nn.Linear`` layers is written true: PEFT then sets each
layer by its class (warning about the ``nn.Linear`` ones).

Note (what is refused): PEFT options that change the layer's formula --
rsLoRA (:math:`s = \alpha/\sqrt r`), DoRA, trained biases,
``modules_to_save`` -- raise ``ValueError`` on load rather than load into a
layer that would compute something else.

Note (hostile configs): ``adapter_config.json`` is input. Wrong JSON types
(``r: 4.7``, ``lora_alpha: "8"``, a list instead of an object) are a
``ValueError`` naming the field, and ``rank_pattern`` / ``alpha_pattern``
keys are matched with a bounded cost
(:func:`~qlora_ref.nn.targets.pattern_matcher`).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from ..dtypes import FLOAT_DTYPES
from .._atomic import (atomic_directory, complete_directory, is_marker_part, is_temporary_directory,
                       read_regular_file, recover_directory, refuse_symlink, regular_file_path,
                       write_atomic)
from .lora import LoRALinear, lora_scaling
from ..validation import (MAX_LORA_ALPHA, MAX_LORA_RANK, QUANT_BITS, QUANT_TYPES, VALID_BLOCKSIZES,
                          check_lora_alpha, check_lora_rank, check_real, is_int, passes)
from .model import prepare_model, replace_module
from .quantized import QuantizedLinear
from .targets import check_regex_cost, pattern_matcher, pattern_value  # noqa: F401  (importable here)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "BASE_METADATA_KEY", "save_adapter", "load_adapter",
           "adapter_key", "base_record", "read_base_record", "task_type_of",
           "canonical_safetensors"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: Key, in the safetensors metadata of ``adapter_model.safetensors``, of the base's format.
BASE_METADATA_KEY = "qlora_ref.base"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?:(?P<path>.+)\.)?lora_(?P<which>[AB])\.weight$")


def adapter_key(path: str, which: str) -> str:
    """PEFT's state-dict key for ``lora_A`` / ``lora_B`` (``which`` is ``"A"`` or ``"B"``) of module ``path``."""
    return f"{_PREFIX}{path + '.' if path else ''}lora_{which}.weight"


def _lora_layers(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


# transformers' auto-class tables (in this order) -> PEFT's task type
_TASK_TYPES = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
    ("MODEL_MAPPING_NAMES", "FEATURE_EXTRACTION"),
)


def task_type_of(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a ``transformers`` model, from its class or ``config.architectures``.

    ``"CAUSAL_LM"`` for a class transformers lists under ``AutoModelForCausalLM``,
    likewise ``SEQ_2_SEQ_LM``, ``SEQ_CLS``, ``TOKEN_CLS``, ``QUESTION_ANS``,
    and ``FEATURE_EXTRACTION`` for a bare ``AutoModel`` class; None for any
    other model (transformers is imported only for a transformers model).
    """
    config = getattr(model, "config", None)
    if not type(model).__module__.startswith("transformers.") and config is None:
        return None
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # pragma: no cover - a config attribute without transformers
        return None
    names = [type(model).__name__] + list(getattr(config, "architectures", None) or [])
    for name in names:
        for table, task_type in _TASK_TYPES:
            for value in getattr(modeling_auto, table, {}).values():
                if name == value or (isinstance(value, (tuple, list)) and name in value):
                    return task_type
    return None


def _name_or_path(model: nn.Module) -> str | None:
    """``model.name_or_path`` (transformers: where ``from_pretrained`` read it), or None."""
    name = getattr(model, "name_or_path", None)
    if not name:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


def _base_format(layer: LoRALinear) -> dict:
    base = layer.base_layer
    if not isinstance(base, QuantizedLinear):
        return {"quant_bits": 16}
    dtype = base.compute_dtype
    return {"quant_bits": base.bits, **base.quant_config(),
            "compute_dtype": None if dtype is None else str(dtype).replace("torch.", "")}


def base_record(model: nn.Module) -> dict | None:
    """The base format all adapted layers of ``model`` share, as :func:`save_adapter` records it.

    ``{"quant_bits": 4, "quant_type": ..., "blocksize": ..., "double_quant": ...,
    "compute_dtype": ...}`` (8 bits: ``quant_bits``, ``blocksize``,
    ``compute_dtype``; 16 bits: ``quant_bits`` only); None when the layers
    differ (nothing is recorded: one record rebuilds one base).
    """
    formats = {json.dumps(_base_format(m), sort_keys=True) for m in _lora_layers(model).values()}
    return json.loads(formats.pop()) if len(formats) == 1 else None


def _fan_in_fan_out(layers: dict) -> bool:
    """The config's ``fan_in_fan_out``: true when some adapted layer wraps a ``Conv1D``."""
    return any(getattr(m, "fan_in_fan_out", False) for m in layers.values())


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header written in one fixed order.

    A safetensors file is an 8-byte little-endian header length, a JSON
    header (tensor names, dtypes, shapes, offsets into the data; an optional
    ``__metadata__`` object of strings), padded with spaces to a multiple of
    8 bytes, then the raw tensor data. The ``safetensors`` library writes the
    metadata from a hash map, so with two metadata keys their order changes
    from process to process, and two saves of the same adapters would differ
    in their bytes. Re-writing the header with sorted keys makes the file a
    function of its content; the offsets are relative to the data, which is
    copied unchanged.
    """
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)          # the padding safetensors writes: data 8-byte aligned
    return len(text).to_bytes(8, "little") + text + data[8 + length:]


_INFER = "infer"


def save_adapter(model: nn.Module, directory: str | os.PathLike,
                 base_model_name_or_path: str | None = None,
                 task_type: str | None = _INFER) -> Path:
    """Write the adapters of ``model`` to ``directory`` in PEFT's layout.

    Parameters
    ----------
    model : nn.Module
        A model with :class:`~qlora_ref.nn.LoRALinear` layers (from :func:`~qlora_ref.prepare_model`).
    directory : path
        Created if needed; ``adapter_config.json`` and ``adapter_model.safetensors`` go in it.
        A new folder, or one holding only an adapter, is replaced whole
        (:func:`qlora_ref._atomic.atomic_directory`: a kill or a full disk
        leaves the complete old adapter or the complete new one, and the
        next save or load finds it); into a folder holding other files the
        two files are written one by one, each atomically. A symlink is
        refused.
    base_model_name_or_path : str, optional
        Recorded in the config, where ``peft.AutoPeftModel*`` loads the base
        from. Default: the model's ``name_or_path`` (None if it has none).
    task_type : str or None, optional
        PEFT's task type (``"CAUSAL_LM"``, ...); default inferred by :func:`task_type_of`.

    Returns
    -------
    pathlib.Path
        ``directory``.

    Examples
    --------
    >>> import tempfile, torch
    >>> from torch.nn import Linear, ReLU, Sequential
    >>> mlp = lambda: Sequential(Linear(64, 32), ReLU(), Linear(32, 8))
    >>> folder = save_adapter(prepare_model(mlp(), r=2, quant_type="fp4"), tempfile.mkdtemp())
    >>> read_base_record(folder / WEIGHTS_NAME)
    {'blocksize': 64, 'compute_dtype': None, 'double_quant': True, 'quant_bits': 4, 'quant_type': 'fp4'}
    >>> loaded = load_adapter(mlp(), folder)  # the recorded base is rebuilt
    >>> type(loaded[0].base_layer).__name__, loaded[0].base_layer.quant_type
    ('Linear4bit', 'fp4')
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRALinear layers; nothing to save "
                         "(use qlora_ref.prepare_model first)")
    if task_type == _INFER:
        task_type = task_type_of(model)
    elif task_type is not None and task_type not in {t for _, t in _TASK_TYPES}:
        raise ValueError(f"task_type must be None or one of PEFT's "
                         f"{sorted(t for _, t in _TASK_TYPES)}, got {task_type!r}")
    if base_model_name_or_path is None:
        base_model_name_or_path = _name_or_path(model)
    r = Counter(m.r for m in layers.values()).most_common(1)[0][0]
    alpha = Counter(m.lora_alpha for m in layers.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": r, "lora_alpha": alpha,
        "lora_dropout": Counter(m.lora_dropout for m in layers.values()).most_common(1)[0][0],
        "target_modules": sorted(layers),
        "rank_pattern": {name: m.r for name, m in layers.items() if m.r != r},
        "alpha_pattern": {name: m.lora_alpha for name, m in layers.items()
                          if m.lora_alpha != alpha},
        "bias": "none", "fan_in_fan_out": _fan_in_fan_out(layers), "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None,
    }
    tensors = {}
    for name, m in layers.items():
        tensors[adapter_key(name, "A")] = m.lora_A.detach().cpu().contiguous().clone()  # (r, in)
        tensors[adapter_key(name, "B")] = m.lora_B.detach().cpu().contiguous().clone()  # (out, r)
    metadata = {"format": "pt"}
    record = base_record(model)
    if record is not None:
        metadata[BASE_METADATA_KEY] = json.dumps(record, sort_keys=True)
    directory = Path(directory)
    refuse_symlink(directory, "adapter folder")
    files = {CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
             WEIGHTS_NAME: canonical_safetensors(save(tensors, metadata=metadata))}
    if is_temporary_directory(directory):  # atomic_directory is filling it: write into it
        for name, data in files.items():
            write_atomic(directory / name, data)
        return directory
    recover_directory(directory)  # what a killed save left: restored or deleted
    held = set(os.listdir(directory)) if directory.is_dir() else set()
    held = {name for name in held if not is_marker_part(name)}
    if not held <= set(files):  # a folder with other files is never replaced whole
        for name, data in files.items():
            write_atomic(directory / name, data)
        return directory
    with atomic_directory(directory) as tmp:
        for name, data in files.items():
            write_atomic(tmp / name, data)
    return directory


_RECORD_FIELDS = {  # field -> (check, what it must be)
    "quant_bits": (lambda v: v in QUANT_BITS and not isinstance(v, bool), "4, 8 or 16"),
    "quant_type": (lambda v: v in QUANT_TYPES, f"one of {QUANT_TYPES}"),
    "blocksize": (lambda v: is_int(v) and v in VALID_BLOCKSIZES,
                  f"a positive integer, one of {VALID_BLOCKSIZES}"),
    "double_quant": (lambda v: isinstance(v, bool), "true or false"),
    "compute_dtype": (lambda v: v is None or v in FLOAT_DTYPES, f"null or one of {FLOAT_DTYPES}"),
}
_RECORD_NEEDS = {4: {"quant_type", "blocksize", "double_quant"}, 8: {"blocksize"}, 16: set()}


def read_base_record(path: str | os.PathLike) -> dict | None:
    """The base format recorded in the ``adapter_model.safetensors`` at ``path``, or None.

    The record is input: it must be a JSON object with known fields of the
    right JSON types (:data:`BASE_METADATA_KEY`; see :func:`save_adapter`),
    and every failure is a ``ValueError`` naming the file and the field.
    """
    path = Path(path)
    try:
        with regular_file_path(path, "adapter weights") as name, \
                safe_open(name, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    text = metadata.get(BASE_METADATA_KEY)
    if text is None:
        return None
    where = f"{path}: metadata {BASE_METADATA_KEY!r}"
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where} must be a JSON object, got a {type(record).__name__}")
    unknown = sorted(set(record) - set(_RECORD_FIELDS))
    if unknown:
        raise ValueError(f"{where} has unknown fields {unknown}; known: {sorted(_RECORD_FIELDS)}")
    for key, value in record.items():
        ok, what = _RECORD_FIELDS[key]
        if not ok(value):
            raise ValueError(f"{where}: {key} must be {what}, got {value!r}")
    if "quant_bits" not in record:
        raise ValueError(f"{where} has no quant_bits")
    missing = sorted(_RECORD_NEEDS[record["quant_bits"]] - set(record))
    if missing:
        raise ValueError(f"{where}: quant_bits={record['quant_bits']} needs {missing}")
    return record


def _prepare_kwargs(record: dict | None, given: dict) -> dict:
    """``prepare_model`` arguments: the recorded base, unless the caller chose the precision."""
    if record is None or "quant_type" in given or "quant_bits" in given:
        kwargs = dict(given)
        kwargs.setdefault("quant_type", None)  # nothing recorded: a 16-bit base, as before
        return kwargs
    kwargs = dict(record)
    if kwargs["quant_bits"] != 4:
        kwargs["quant_type"] = None
    return {**kwargs, **given}


def _read(directory: Path) -> tuple[dict, dict]:
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise ValueError(f"{directory} has no {name}; is it a PEFT LoRA adapter directory?")
    config = _read_config(directory / CONFIG_NAME)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{directory}: peft_type {config['peft_type']!r} is not LORA")
    refused = {"use_rslora": False, "use_dora": False,
               "bias": "none", "lora_bias": False, "modules_to_save": None}
    for key, fine in refused.items():
        value = config.get(key, fine)
        if value != fine and not (fine is None and not value):
            raise ValueError(f"{directory}: {key}={config[key]!r} is not supported by qlora_ref "
                             f"(only {key}={fine!r}); the layers would compute something else")
    try:
        with regular_file_path(directory / WEIGHTS_NAME, "adapter weights") as name:
            tensors = load_file(name)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{directory / WEIGHTS_NAME} is not a readable safetensors file: "
                         f"{exc}") from None
    weights = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{directory}: unexpected tensor {key!r}; expected only "
                             "'base_model.model.<module path>.lora_A.weight' / '.lora_B.weight'")
        if not tensor.is_floating_point():  # decided: refused, not cast (an int32 B is no adapter)
            raise ValueError(f"{directory}: tensor {key!r} is {str(tensor.dtype).replace('torch.', '')}"
                             "; LoRA weights must be floating-point")
        weights.setdefault(match["path"] or "", {})[match["which"]] = tensor
    return config, weights


def _is_number(value) -> bool:
    return passes(lambda v: check_real(v, "value"), value)  # a 401-digit integer: False


def _is_alpha(value) -> bool:
    return passes(check_lora_alpha, value)


def _is_rank(value) -> bool:
    return passes(check_lora_rank, value)


def _short(value) -> str:
    """``repr(value)``, cut to 40 characters (a 401-digit number is not printed whole)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


#: An adapter_config.json is a few hundred bytes; a larger one is refused before it is parsed.
_MAX_CONFIG_BYTES = 1 << 20


def _read_config(path: Path) -> dict:
    """``adapter_config.json``, with the fields we use checked for JSON type and range.

    Every failure is one ``ValueError`` naming the file and the field.
    """
    try:
        config = json.loads(read_regular_file(path, _MAX_CONFIG_BYTES, "adapter config"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(config).__name__}")
    checks = {
        "peft_type": (lambda v: isinstance(v, str), "a string"),
        "r": (_is_rank, f"a positive integer, at most {MAX_LORA_RANK}"),
        "lora_alpha": (_is_alpha, f"a finite number within +-{MAX_LORA_ALPHA:g}"),
        "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
        "rank_pattern": (lambda v: v is None or isinstance(v, dict), "an object (or null)"),
        "alpha_pattern": (lambda v: v is None or isinstance(v, dict), "an object (or null)"),
    }
    for key, (ok, what) in checks.items():
        if key in config and not ok(config[key]):
            raise ValueError(f"{path}: {key} must be {what}, got {_short(config[key])}")
    for field, ok, what in (("rank_pattern", _is_rank, f"a positive integer, at most {MAX_LORA_RANK}"),
                            ("alpha_pattern", _is_alpha, f"a finite number within +-{MAX_LORA_ALPHA:g}")):
        for key, value in (config.get(field) or {}).items():
            if not ok(value):
                raise ValueError(f"{path}: {field}[{key!r}] must be {what}, got {_short(value)}")
    return config


def _check_ranks(directory: Path, weights: dict, rank_pattern: list, default_r: int) -> None:
    """Each layer's rank from the config (``r`` or ``rank_pattern``) against its saved tensors.

    The tensors already give the rank (``lora_A``: ``(r, in)``, ``lora_B``:
    ``(out, r)``); comparing first means a 1 kB config claiming ``r: 100000``
    is refused before layers of that rank are allocated (3.9 GB).
    """
    for name, pair in sorted(weights.items()):
        r = pattern_value(rank_pattern, name, default_r)
        for which, axis in (("A", 0), ("B", 1)):
            tensor = pair.get(which)
            if tensor is None:
                raise ValueError(f"{directory}: layer '{name}' has no lora_{which} tensor")
            if tensor.ndim != 2 or tensor.shape[axis] != r:
                raise ValueError(f"{directory}: layer '{name}': saved lora_{which} has shape "
                                 f"{tuple(tensor.shape)}, but the config gives it rank r={r}")


def load_adapter(model: nn.Module, directory: str | os.PathLike, strict: bool = True,
                 **prepare_kwargs) -> nn.Module:
    """Load a PEFT LoRA adapter (saved by :func:`save_adapter` or by PEFT) into ``model``.

    If ``model`` has no LoRA layers yet, the layers named in the adapter are
    prepared first with :func:`~qlora_ref.prepare_model`, with each layer's
    rank taken from the saved tensors, over the base recorded with the
    adapter (:func:`read_base_record`: the model that was saved is rebuilt).
    ``prepare_kwargs`` override the record: ``quant_type`` or ``quant_bits``
    choose another base (e.g. ``quant_type=None``: 16-bit), others such as
    ``compute_dtype`` replace that field. Without a record (an adapter saved
    by PEFT) the default is a 16-bit base.

    Each layer's ``lora_alpha``, ``scaling`` and ``lora_dropout`` are set from
    the adapter config.

    Parameters
    ----------
    model : nn.Module
    directory : path
    strict : bool
        Also require every LoRA layer of ``model`` to have weights in the adapter.

    Returns
    -------
    nn.Module
        ``model`` (changed in place).

    Raises
    ------
    ValueError
        On a config field of the wrong type or range, or a pattern key that
        :func:`~qlora_ref.nn.targets.pattern_matcher` refuses (naming the field); a tensor whose
        shape differs from the layer's (naming the layer and both shapes);
        weights for a layer the model lacks, or missing layers when ``strict``.
    """
    directory = complete_directory(directory)  # where a killed save left the complete copy
    config, weights = _read(directory)
    default_r, default_alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = _patterns(directory, config)
    dropout = float(config.get("lora_dropout", 0.0))

    _check_ranks(directory, weights, rank_pattern, default_r)  # before any layer is allocated
    if not _lora_layers(model):
        model = _prepare_for(model, directory, weights, rank_pattern, default_r, default_alpha,
                             dropout, prepare_kwargs)
    layers = _lora_layers(model)
    _check_fit(directory, config, weights, layers, strict)
    with torch.no_grad():
        for name, pair in weights.items():
            layer = layers[name]
            layer.lora_A.copy_(pair["A"])
            layer.lora_B.copy_(pair["B"])
            layer.lora_alpha = pattern_value(alpha_pattern, name, default_alpha)
            layer.scaling = lora_scaling(layer.lora_alpha, layer.r)
            layer.lora_dropout = dropout
    return model


def _patterns(directory: Path, config: dict) -> tuple[list, list]:
    """``rank_pattern`` and ``alpha_pattern`` as (matcher, value) lists; a bad key names its field."""
    patterns = {}
    for field in ("rank_pattern", "alpha_pattern"):
        try:
            patterns[field] = [(pattern_matcher(key), value)
                               for key, value in (config.get(field) or {}).items()]
        except ValueError as exc:
            raise ValueError(f"{directory / CONFIG_NAME}: {field}: {exc}") from None
    return patterns["rank_pattern"], patterns["alpha_pattern"]


def _prepare_for(model, directory: Path, weights: dict, rank_pattern: list, default_r: int,
                 default_alpha, dropout: float, prepare_kwargs: dict) -> nn.Module:
    """Add LoRA layers where the adapter has weights, over the base its record names."""
    record = read_base_record(directory / WEIGHTS_NAME)
    model = prepare_model(model, r=default_r, lora_alpha=default_alpha, lora_dropout=dropout,
                          target_modules="|".join(map(re.escape, sorted(weights))),
                          **_prepare_kwargs(record, prepare_kwargs))
    for name, layer in _lora_layers(model).items():  # a rank from rank_pattern
        r = pattern_value(rank_pattern, name, default_r)
        if r != layer.r:
            new = LoRALinear(layer.base_layer, r, layer.lora_alpha, dropout,
                             fan_in_fan_out=layer.fan_in_fan_out)
            new.name = name
            model = replace_module(model, name, new)
    return model


def _check_fit(directory: Path, config: dict, weights: dict, layers: dict, strict: bool) -> None:
    """The adapter's layers, layout and tensor shapes against the model's LoRA layers."""
    unknown = sorted(set(weights) - set(layers))
    if unknown:
        raise ValueError(f"{directory}: adapter has weights for {unknown}, which are not LoRA "
                         f"layers of the model (its LoRA layers: {sorted(layers)})")
    flag, conv1d = config.get("fan_in_fan_out", False), _fan_in_fan_out(
        {name: layers[name] for name in weights})
    if flag != conv1d:
        kinds = sorted(name for name in weights
                       if getattr(layers[name], "fan_in_fan_out", False) == conv1d)
        raise ValueError(f"{directory / CONFIG_NAME}: fan_in_fan_out={flag} but the layers "
                         f"{kinds[:3]}{'...' if len(kinds) > 3 else ''} are "
                         f"{'transformers Conv1D (weight (in, out))' if conv1d else 'nn.Linear'}"
                         f"; an adapter for {'nn.Linear' if conv1d else 'Conv1D (GPT-2)'} "
                         "layers does not fit this model")
    missing = sorted(set(layers) - set(weights))
    if strict and missing:
        raise ValueError(f"{directory}: adapter has no weights for the model's LoRA layers "
                         f"{missing} (pass strict=False to leave them as they are)")
    for name, pair in sorted(weights.items()):
        layer = layers[name]
        if layer.merged:
            raise ValueError(f"{layer.label()} is merged; unmerge() it before loading adapters")
        for which in ("A", "B"):
            param = getattr(layer, f"lora_{which}")
            tensor = pair.get(which)
            if tensor is None:
                raise ValueError(f"{directory}: layer '{name}' has no lora_{which} tensor")
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(f"{directory}: layer '{name}': saved lora_{which} has shape "
                                 f"{tuple(tensor.shape)}, the model's {layer._shape()} with "
                                 f"r={layer.r} needs {tuple(param.shape)}")
