r"""What defines a fine-tuning run: the two configuration dataclasses and the JSON file that names them.

:class:`FinetuneConfig` is a run of the tiny GPT on a generated task;
:class:`HFFinetuneConfig` a run of a local Hugging Face causal LM on a JSONL
file. Both are trained by the one loop of :mod:`qlora_ref.train.loop`. Field
names follow ``transformers.BitsAndBytesConfig`` (``bnb_4bit_*``),
``peft.LoraConfig`` (``r``, ``lora_alpha``, ``lora_dropout``,
``target_modules``, ``init_lora_weights``) and
``transformers.TrainingArguments`` (``learning_rate``, ``num_train_epochs``,
``per_device_train_batch_size``, ``gradient_accumulation_steps``,
``max_grad_norm``, ``optim``, ``save_steps``) where they overlap.

The JSON type each field takes is read from the dataclass annotations
(:func:`field_types`), so a new field is declared once; ranges are checked
in ``__post_init__``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import typing
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..validation import (INITS, OPTIMIZERS, QUANT_BITS, QUANT_TYPES, check_config_bounds,
                          check_positive_int)
from . import tasks

__all__ = ["FinetuneConfig", "HFFinetuneConfig", "load_config", "field_types", "FIELD_TYPES",
           "CONFIG_ALIASES", "RESUMABLE_CHANGES"]

#: Names people bring from other tools, mapped to ours (``None``: accepted and ignored).
CONFIG_ALIASES = {"lora_r": "r", "load_in_4bit": None, "load_in_8bit": None,
                  "num_epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size"}

#: Config fields a resumed run may change: they say how long to train and what to log,
#: not what a step computes. Any other difference is refused.
RESUMABLE_CHANGES = ("max_steps", "num_train_epochs", "save_steps", "logging_steps", "eval_size")


@dataclasses.dataclass
class FinetuneConfig:
    """Everything that defines a fine-tuning run of the tiny GPT (see the module docstring)."""

    base_model: Optional[str] = "default"   #: a base-model .safetensors file, or "default"
    task: str = tasks.DEFAULT_FINETUNE_TASK
    quant_bits: int = 4                     #: 4 (QLoRA), 8 (blockwise 8-bit) or 16 (LoRA)
    bnb_4bit_quant_type: str = "nf4"        #: "nf4", "fp4" or "int4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Optional[str] = None  #: default float32 on CPU, bfloat16 on CUDA
    full_finetune: bool = False             #: train every weight (float32), no adapters
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: Union[str, list] = "all-linear"  #: "all-linear", a regex, or layer names
    init_lora_weights: str = "lora"         #: "lora", "gaussian" or "loftq"
    learning_rate: float = 3e-3
    num_train_epochs: float = 3.0
    train_size: int = 3000                  #: examples in the fixed training set
    per_device_train_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_steps: int = -1                     #: > 0 overrides num_train_epochs
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    optim: str = "paged_adamw"              #: "paged_adamw", "adamw" or "bnb_paged_adamw"
    eval_size: int = 200
    logging_steps: int = 10
    save_steps: int = 0                     #: checkpoint every N steps (0: only at the end)
    seed: int = 0

    #: Fields a resumed run compares by the content they name (a sha256), not by their text.
    CONTENT_FIELDS = ("base_model",)

    def __post_init__(self):
        _check_field_types(self)
        _check_ranges(self)
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            from ..nn.targets import check_regex_cost

            check_regex_cost(self.target_modules, "target_modules")
        self._check_data()

    def _check_data(self) -> None:
        """The fields that say what data the run reads (a JSONL run overrides this)."""
        if self.per_device_train_batch_size > self.train_size:  # bounds a micro-batch's memory
            raise ValueError(f"per_device_train_batch_size {self.per_device_train_batch_size} "
                             f"is larger than the training set ({self.train_size} examples)")
        tasks.get_task(self.task)  # unknown task -> ValueError listing the known ones

    @property
    def batch_size(self) -> int:
        return self.per_device_train_batch_size

    def total_steps(self, world_size: int = 1) -> int:
        """Optimizer steps of the run: ``max_steps`` or ``epochs * train_size / global batch``."""
        if self.max_steps > 0:
            return self.max_steps
        per_step = self.batch_size * self.gradient_accumulation_steps * world_size
        return max(1, math.ceil(self.num_train_epochs * self.train_size / per_step))

    def method(self) -> str:
        """A short label: ``full``, ``lora16``, ``qlora-nf4``, ``qlora-fp4``, ``lora8``..."""
        if self.full_finetune:
            return "full"
        if self.quant_bits == 4:
            return f"qlora-{self.bnb_4bit_quant_type}"
        return f"lora{self.quant_bits}"


@dataclasses.dataclass
class HFFinetuneConfig(FinetuneConfig):
    """A :class:`FinetuneConfig` for a local Hugging Face model folder and a JSONL file.

    ``base_model`` is the model folder (``config.json``, weights, tokenizer
    files); ``dataset_path`` a JSONL file. ``task``, ``train_size`` and
    ``eval_size`` are set from the data. The defaults follow the paper's
    recipe for 7B-13B models where they differ from the tiny GPT's: learning
    rate 2e-4, dropout 0.05, batch 8.
    """

    base_model: Optional[str] = ""
    task: str = "jsonl"
    learning_rate: float = 2e-4
    lora_dropout: float = 0.05
    per_device_train_batch_size: int = 8
    dataset_path: str = ""
    max_length: int = 512                   #: tokens per example (prompt + completion + EOS)
    truncate: bool = False                  #: cut over-long examples instead of refusing them

    CONTENT_FIELDS = ("base_model", "dataset_path", "task")  # task: the data file's name

    def _check_data(self) -> None:
        if not self.base_model or self.base_model == "default":
            raise ValueError("base_model must name a local Hugging Face model folder (--model DIR)")
        if not self.dataset_path:
            raise ValueError("dataset_path must name a JSONL file (--data FILE.jsonl)")
        if self.max_length < 2:
            raise ValueError(f"max_length must be an integer of at least 2, got {self.max_length!r}")


# ----------------------------------------------------------------------------- checks

def _json_types(annotation) -> tuple:
    """The JSON types an annotation allows: ``Optional[float]`` -> ``(float, NoneType)``."""
    if typing.get_origin(annotation) is Union:
        return tuple(t for arg in typing.get_args(annotation) for t in _json_types(arg))
    if annotation is list or typing.get_origin(annotation) is list:
        return (list,)
    if annotation in (str, int, float, bool, type(None)):
        return (annotation,)
    raise TypeError(f"no JSON type for the annotation {annotation!r}")


@functools.cache
def field_types(config_class: type) -> dict:
    """``{field: JSON types}`` of a config dataclass, read from its annotations."""
    hints = typing.get_type_hints(config_class)
    return {f.name: _json_types(hints[f.name]) for f in dataclasses.fields(config_class)}


#: The JSON types each field of :class:`FinetuneConfig` takes (a ``float`` field takes an
#: integer too; ``bool`` is never an integer).
FIELD_TYPES = field_types(FinetuneConfig)

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list of strings", type(None): "null"}


def _check_field_types(config) -> None:
    """Raise ``ValueError`` naming the first field whose value has the wrong JSON type."""
    for name, types in field_types(type(config)).items():
        value = getattr(config, name)
        if isinstance(value, (bool, np.bool_)):
            ok = bool in types
        elif isinstance(value, (int, np.integer)):
            ok = int in types or float in types
        elif isinstance(value, (float, np.floating)):
            ok = float in types
        elif isinstance(value, (list, tuple)):
            ok = list in types and bool(value) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, tuple(t for t in types if t not in (int, float, bool, list)))
        if not ok:
            want = " or ".join(_TYPE_NAMES[t] for t in types)
            raise ValueError(f"{name} must be {want}, got {value!r} ({type(value).__name__})")


def _check_ranges(c: FinetuneConfig) -> None:
    """Raise ``ValueError`` naming the first field outside its range (types are checked already)."""
    if c.quant_bits not in QUANT_BITS:
        raise ValueError(f"quant_bits must be 4, 8 or 16, got {c.quant_bits!r}")
    for name in ("r", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "train_size", "eval_size", "logging_steps"):
        check_positive_int(getattr(c, name), name)
    for name in ("learning_rate", "lora_alpha", "lora_dropout", "weight_decay", "num_train_epochs"):
        if not _finite(getattr(c, name)):
            raise ValueError(f"{name} must be a finite number, got {getattr(c, name)!r}")
    if not c.learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {c.learning_rate!r}")
    if not 0 <= c.lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {c.lora_dropout!r}")
    if c.weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {c.weight_decay!r}")
    if c.max_grad_norm is not None and not (_finite(c.max_grad_norm) and c.max_grad_norm >= 0):
        raise ValueError(f"max_grad_norm must be a finite number >= 0 (or None), "
                         f"got {c.max_grad_norm!r}")
    if c.max_steps <= 0 and c.max_steps != -1:
        raise ValueError(f"max_steps must be a positive integer (or -1: train for "
                         f"num_train_epochs), got {c.max_steps!r}")
    if c.max_steps == -1 and not c.num_train_epochs > 0:
        raise ValueError(f"num_train_epochs must be positive when max_steps is not set, "
                         f"got {c.num_train_epochs!r}")
    if c.save_steps < 0:
        raise ValueError(f"save_steps must be >= 0 (0: only at the end), got {c.save_steps!r}")
    if not 0 <= c.seed < 2 ** 63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {c.seed!r}")
    for name, allowed in (("bnb_4bit_quant_type", QUANT_TYPES),
                          ("optim", OPTIMIZERS),
                          ("init_lora_weights", INITS),
                          ("bnb_4bit_compute_dtype", (None, "float32", "float16", "bfloat16"))):
        if getattr(c, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(c, name)!r}")
    check_config_bounds(c)  # upper bounds: sizes before anything is allocated, huge numbers


def _finite(value) -> bool:
    """``math.isfinite`` that says False for an integer too large for a float (a 401-digit one)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


# ----------------------------------------------------------------------------- the JSON file

def _read_entry(path: Path, name: str) -> dict:
    """The named entry of a JSON file of ``{name: {field: value}}``; one-line errors."""
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a config file")
    if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
        raise ValueError(f"{path} is not a regular file, so not a config file")
    try:
        configs = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no config file at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(configs, dict):
        raise ValueError(f"{path} must hold a JSON object of named configurations "
                         f"({{name: {{field: value}}}}), got a {type(configs).__name__}")
    if name not in configs:
        raise ValueError(f"{path} has no configuration {name!r}; it has: {', '.join(configs)}")
    if not isinstance(configs[name], dict):
        raise ValueError(f"{path}:{name}: must be a JSON object of fields, "
                         f"got a {type(configs[name]).__name__}")
    return configs[name]


def load_config(path: str | os.PathLike, name: str, **overrides) -> FinetuneConfig:
    """Read the named configuration from a JSON file of ``{name: {field: value}}``.

    Keys starting with ``_`` are comments. Unknown fields are an error that
    lists the known ones; the names of :data:`CONFIG_ALIASES` are accepted.
    An entry with a ``dataset_path`` (or a ``dataset_path`` override) is a
    JSONL run on a Hugging Face model and gives a :class:`HFFinetuneConfig`.
    ``overrides`` (``None`` values ignored) win over the file.

    The file is checked on its own first, so that every error in it is one
    ``ValueError`` line starting ``FILE:NAME: KEY ...``; then the overrides
    are applied and checked.
    """
    path = Path(path)
    entry = _read_entry(path, name)
    config_class = HFFinetuneConfig if "dataset_path" in entry or overrides.get("dataset_path") \
        else FinetuneConfig
    fields = {f.name for f in dataclasses.fields(config_class)}
    values = {}
    for key, value in entry.items():
        if key.startswith("_"):  # a comment, e.g. "_source"
            continue
        key = CONFIG_ALIASES.get(key, key)
        if key is None:
            continue
        if key not in fields:
            raise ValueError(f"{path}:{name}: unknown field {key!r}; known: {', '.join(sorted(fields))}")
        values[key] = value
    file_values = dict(values)
    if config_class is HFFinetuneConfig:  # a hub name in the file is replaced by --model
        file_values.update({k: v for k, v in overrides.items()
                            if k in ("base_model", "dataset_path") and v is not None})
    try:
        config_class(**file_values)  # the file alone: its errors name the file
    except ValueError as exc:
        raise ValueError(f"{path}:{name}: {exc}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return config_class(**values)
