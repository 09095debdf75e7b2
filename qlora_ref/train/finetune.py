r"""The main job: fine-tune the tiny base GPT with QLoRA, evaluate, save, report.

Paper section 4 ("QLoRA vs. Standard Finetuning") in miniature: the base
model's linear layers are stored in NF4 with double quantization and
frozen; LoRA adapters on every linear layer are the only trainable
weights; the optimizer is a paged AdamW; the loss counts answer tokens
only. The same loop also trains the comparison arms of ``compare``: a
16-bit LoRA base (``quant_bits=16``), an 8-bit blockwise base
(``quant_bits=8``), FP4/Int4 bases, and full fine-tuning (``full_finetune``).

The loop, for each optimizer step:

.. math::

    \mathbf g = \frac{1}{K}\sum_{k=1}^{K} \nabla_{\mathbf A,\mathbf B}\,
        \mathcal L(\text{micro-batch}_k), \qquad
    (\mathbf A, \mathbf B) \leftarrow \operatorname{AdamW}(\mathbf g)

with :math:`K` = ``gradient_accumulation_steps``. Under ``torchrun`` each
rank takes its own slice of every batch and DistributedDataParallel
averages the adapters' gradients (the frozen 4-bit base has none).

Training data is a fixed, generated set of ``train_size`` examples, read in
a new order each epoch (the order is a function of the seed and the epoch),
so a checkpoint's data position is just the step count; a resumed run
replays exactly the batches an uninterrupted run would have seen.

Faults (see :mod:`qlora_ref.train.checkpoint`): every output path is checked
and the output folder locked before the first step; checkpoints are switched
into place only when complete, hold no pickle, and are verified (and their
configuration compared with the run's) before a resume; a non-finite loss
stops the run with the last good checkpoint kept; a full disk is reported as
one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..nn import prepare_model, save_adapter, trainable_parameters
from ..optim import make_optimizer
from . import checkpoint as ckpt
from . import tasks
from .pretrain import default_base_model_path, load_base_model

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "load_config", "CONFIG_ALIASES",
           "TrainingDiverged", "check_output_dir", "RESUMABLE_CHANGES", "FIELD_TYPES"]

#: Names people bring from other tools, mapped to ours (``lora_r`` is in the issue's example).
CONFIG_ALIASES = {"lora_r": "r", "load_in_4bit": None, "load_in_8bit": None}


@dataclasses.dataclass
class FinetuneConfig:
    """Everything that defines a fine-tuning run.

    Field names follow ``transformers.BitsAndBytesConfig`` (``bnb_4bit_*``)
    and ``peft.LoraConfig`` (``r``, ``lora_alpha``, ``lora_dropout``,
    ``target_modules``, ``init_lora_weights``) where they overlap, and
    ``transformers.TrainingArguments`` for the loop (``learning_rate``,
    ``num_train_epochs``, ``per_device_train_batch_size``,
    ``gradient_accumulation_steps``, ``max_grad_norm``, ``optim``).
    """

    base_model: str = "default"            #: a base-model .safetensors file, or "default"
    task: str = tasks.DEFAULT_FINETUNE_TASK
    quant_bits: int = 4                     #: 4 (QLoRA), 8 (blockwise 8-bit) or 16 (LoRA)
    bnb_4bit_quant_type: str = "nf4"        #: "nf4", "fp4" or "int4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Optional[str] = None  #: default float32 on CPU, bfloat16 on CUDA
    full_finetune: bool = False             #: train every weight in 16/32-bit, no adapters
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: object = "all-linear"   #: "all-linear" or a list of layer names
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

    def __post_init__(self):
        _check_field_types(self)
        if self.quant_bits not in (4, 8, 16):
            raise ValueError(f"quant_bits must be 4, 8 or 16, got {self.quant_bits!r}")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4", "int4"):
            raise ValueError("bnb_4bit_quant_type must be 'nf4', 'fp4' or 'int4', "
                             f"got {self.bnb_4bit_quant_type!r}")
        for name in ("r", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "train_size", "eval_size", "logging_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("learning_rate", "lora_alpha", "lora_dropout", "weight_decay",
                     "num_train_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and (
                isinstance(self.max_grad_norm, bool) or not isinstance(self.max_grad_norm, (int, float))
                or not math.isfinite(self.max_grad_norm) or self.max_grad_norm < 0):
            raise ValueError(f"max_grad_norm must be a finite number >= 0 (or None), "
                             f"got {self.max_grad_norm!r}")
        for name in ("max_steps", "save_steps"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.max_steps <= 0 and self.max_steps != -1:
            raise ValueError(f"max_steps must be a positive integer (or -1: train for "
                             f"num_train_epochs), got {self.max_steps!r}")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise ValueError(f"num_train_epochs must be positive when max_steps is not set, "
                             f"got {self.num_train_epochs!r}")
        if self.save_steps < 0:
            raise ValueError(f"save_steps must be >= 0 (0: only at the end), got {self.save_steps!r}")
        if not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        for name, allowed in (("optim", ("paged_adamw", "adamw", "bnb_paged_adamw")),
                              ("init_lora_weights", ("lora", "gaussian", "loftq")),
                              ("bnb_4bit_compute_dtype", (None, "float32", "float16", "bfloat16"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            from ..nn.adapters import check_regex_cost

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


#: The JSON types each field takes (a ``float`` field takes an integer too; ``bool`` is
#: never an integer). Ranges are checked in ``FinetuneConfig.__post_init__``.
FIELD_TYPES = {
    "base_model": (str, type(None)), "task": (str,), "quant_bits": (int,), "bnb_4bit_quant_type": (str,),
    "bnb_4bit_use_double_quant": (bool,), "bnb_4bit_compute_dtype": (str, type(None)),
    "full_finetune": (bool,), "r": (int,), "lora_alpha": (float,), "lora_dropout": (float,),
    "target_modules": (str, list), "init_lora_weights": (str,), "learning_rate": (float,),
    "num_train_epochs": (float,), "train_size": (int,), "per_device_train_batch_size": (int,),
    "gradient_accumulation_steps": (int,), "max_steps": (int,), "weight_decay": (float,),
    "max_grad_norm": (float, type(None)), "optim": (str,), "eval_size": (int,),
    "logging_steps": (int,), "save_steps": (int,), "seed": (int,),
}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list of strings", type(None): "null"}


def _check_field_types(config) -> None:
    """Raise ``ValueError`` naming the first field whose value has the wrong JSON type."""
    for name, types in {**FIELD_TYPES, **getattr(config, "EXTRA_FIELD_TYPES", {})}.items():
        value = getattr(config, name)
        if isinstance(value, bool) or isinstance(value, np.bool_):
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


def load_config(path: str | os.PathLike, name: str, **overrides) -> FinetuneConfig:
    """Read the named configuration from a JSON file of ``{name: {field: value}}``.

    Keys starting with ``_`` are comments. Unknown fields are an error that lists the known ones; ``lora_r`` is
    accepted for ``r``, and ``learning_rate``-style names as in
    :class:`FinetuneConfig`. An entry with a ``dataset_path`` (or a
    ``dataset_path`` override) is a JSONL run on a Hugging Face model and
    gives a :class:`~qlora_ref.train.hf_finetune.HFFinetuneConfig`. ``overrides`` (``None`` values ignored) win
    over the file.

    The file is checked against :data:`FIELD_TYPES` and the ranges of
    :class:`FinetuneConfig` on its own first, so that every error in it is
    one ``ValueError`` line starting ``FILE:NAME: KEY ...``; then the
    overrides are applied and checked.
    """
    path = Path(path)
    try:
        configs = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no config file at {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a config file") from None
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
    config_class = FinetuneConfig
    if "dataset_path" in configs[name] or overrides.get("dataset_path"):
        from .hf_finetune import HFFinetuneConfig  # a JSONL run on a Hugging Face model

        config_class = HFFinetuneConfig
    fields = {f.name for f in dataclasses.fields(config_class)}
    values = {}
    for key, value in configs[name].items():
        if key.startswith("_"):  # a comment, e.g. "_source"
            continue
        key = CONFIG_ALIASES.get(key, key)
        if key is None:
            continue
        if key == "num_epochs":
            key = "num_train_epochs"
        if key == "batch_size":
            key = "per_device_train_batch_size"
        if key not in fields:
            raise ValueError(f"{path}:{name}: unknown field {key!r}; known: {', '.join(sorted(fields))}")
        values[key] = value
    file_values = dict(values)
    if config_class is not FinetuneConfig:  # a hub name in the file is replaced by --model
        file_values.update({k: v for k, v in overrides.items()
                            if k in ("base_model", "dataset_path") and v is not None})
    try:
        config_class(**file_values)  # the file alone: its errors name the file
    except ValueError as exc:
        raise ValueError(f"{path}:{name}: {exc}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return config_class(**values)


@dataclasses.dataclass
class FinetuneResult:
    """What a run measured: before/after evaluation, the loss curve, sizes and timings."""

    config: FinetuneConfig
    before: dict
    after: dict
    history: list           #: [(step, training loss)]
    parameters: dict        #: trainable / total parameters, base bytes 4-bit vs 16-bit
    seconds: float          #: training time of all ``steps``, the resumed-from part included
    steps: int
    device: str
    peak_memory_bytes: Optional[int] = None
    output_dir: Optional[str] = None
    resumed_from_step: int = 0  #: the checkpoint's step when resumed, else 0
    #: a few inputs with the model's outputs: [{"prompt", "expected", "before", "after"}]
    examples: list = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["config"] = dataclasses.asdict(self.config)
        return d


# ----------------------------------------------------------------------------- data

def training_set(task: str, size: int, seed: int) -> list:
    """The fixed training set: ``size`` generated (prompt, answer) pairs, no held-out prompt."""
    return tasks.sample_pairs(task, size, np.random.default_rng([seed, 1]))


def batch_indices(step: int, micro: int, config: FinetuneConfig, rank: int, world: int) -> np.ndarray:
    """Indices into the training set for one rank's micro-batch of optimizer step ``step``.

    The examples of all steps form one long stream: epoch ``e`` is the
    permutation ``rng([seed, 2, e])`` of the training set. Step ``s`` reads
    the next ``batch * accumulation * world`` examples of that stream.
    """
    b, k, n = config.batch_size, config.gradient_accumulation_steps, config.train_size
    start = ((step * k + micro) * world + rank) * b
    positions = np.arange(start, start + b)
    epochs, offsets = positions // n, positions % n
    out = np.empty(b, dtype=np.int64)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([config.seed, 2, int(epoch)]).permutation(n)
        out[epochs == epoch] = order[offsets[epochs == epoch]]
    return out


# ----------------------------------------------------------------------------- model

def _compute_dtype(config: FinetuneConfig, device: torch.device) -> torch.dtype:
    if config.bnb_4bit_compute_dtype:
        return getattr(torch, config.bnb_4bit_compute_dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_model(config: FinetuneConfig, device: torch.device):
    """Load the base model and make it trainable as ``config`` says."""
    path = default_base_model_path() if config.base_model in ("default", "", None) else config.base_model
    model = load_base_model(path, device="cpu")
    if config.full_finetune:
        model.requires_grad_(True)
    else:
        model = prepare_model(
            model, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=config.target_modules,
            quant_type=config.bnb_4bit_quant_type if config.quant_bits == 4 else None,
            double_quant=config.bnb_4bit_use_double_quant, quant_bits=config.quant_bits,
            compute_dtype=_compute_dtype(config, device) if config.quant_bits != 16 else None,
            init=config.init_lora_weights)
    return model.to(device)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# ----------------------------------------------------------------------------- loop

def _distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun, else (0, 1); initialises the process group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


class TrainingDiverged(RuntimeError):
    """The training loss (or the gradient norm) became NaN or infinite."""


#: Config fields a resumed run may change: they say how long to train and what to log,
#: not what a step computes. Any other difference is refused.
RESUMABLE_CHANGES = ("max_steps", "num_train_epochs", "save_steps", "logging_steps", "eval_size")


def check_output_dir(out: Path) -> None:
    """Refuse, before any work, an output folder that cannot take the run's files.

    Creates ``out`` if needed. Raises ``ValueError`` (one line) when ``out``
    or a part of its path is a file, when it cannot be created or written,
    or when one of the paths the run writes is of the wrong kind.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"cannot create output directory {out}: a part of its path is a file") from None
    except OSError as exc:
        raise ValueError(f"cannot create output directory {out}: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"output directory {out} is not writable")
    for name in ("adapter", "checkpoint"):
        if (out / name).exists() and not (out / name).is_dir():
            raise ValueError(f"{out / name} exists and is not a directory; the run writes a folder there")
    for name in ("report.md", "report.json", "loss_curve.png"):
        if (out / name).is_dir():
            raise ValueError(f"{out / name} is a directory; the run writes a file there")


def _base_model_file(config: FinetuneConfig) -> Path:
    return Path(default_base_model_path() if config.base_model in ("default", "", None)
                else config.base_model)


def _trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(directory: Path, model, optimizer, step: int, history: list,
                    config: FinetuneConfig, seconds: float = 0.0, world_size: int = 1,
                    base_model_sha256: Optional[str] = None) -> Path:
    """Write a checkpoint of ``step`` under ``directory`` (see :mod:`qlora_ref.train.checkpoint`).

    Tensors (trainable weights, optimizer moments, RNG states) go to one
    safetensors file; the step, loss history, config, the optimizer's
    parameter groups and the training time so far to JSON; the adapters in
    PEFT layout beside them. Returns the new ``step-NNNNNN`` folder.
    """
    tensors = {f"trainable.{n}": t for n, t in _trainable_state(model).items()}
    optimizer_tensors, optimizer_index = ckpt.optimizer_state_to_tensors(optimizer.state_dict())
    tensors.update(optimizer_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    state = {"history": history, "config": dataclasses.asdict(config),
             "base_model_sha256": base_model_sha256, "world_size": world_size,
             "train_seconds": seconds, "optimizer": optimizer_index}
    write_adapter = None if config.full_finetune else (
        lambda folder: save_adapter(model, folder / "adapter"))
    return ckpt.save_checkpoint(Path(directory), step, tensors, state, write_adapter)


def check_resumable(saved: dict, folder: Path, config: FinetuneConfig, total_steps: int,
                    world_size: int = 1, base_model_sha256: Optional[str] = None) -> None:
    """Refuse to resume a checkpoint made with another configuration, base model or world size.

    Only the fields in :data:`RESUMABLE_CHANGES` may differ; the error names the first other one.
    """
    mine = json.loads(json.dumps(dataclasses.asdict(config)))  # as the checkpoint stored it
    theirs = saved.get("config")
    if not isinstance(theirs, dict):
        raise ckpt.CheckpointError(f"{folder / ckpt.TRAINER_STATE} holds no configuration")
    defaults = json.loads(json.dumps(dataclasses.asdict(FinetuneConfig())))
    for name, value in mine.items():
        if name in RESUMABLE_CHANGES or name == "base_model":
            continue
        old = theirs.get(name, defaults[name])
        if old != value:
            raise ckpt.CheckpointError(
                f"{folder} was trained with {name}={old!r}, this run has {name}={value!r}; "
                f"resume with the same {name} or start a new run")
    old_sha = saved.get("base_model_sha256")
    if old_sha and base_model_sha256 and old_sha != base_model_sha256:
        raise ckpt.CheckpointError(
            f"{folder} was trained on another base model (sha256 {old_sha[:12]}...), this run's "
            f"{_base_model_file(config)} has sha256 {base_model_sha256[:12]}...")
    if int(saved.get("world_size", 1)) != world_size:
        raise ckpt.CheckpointError(f"{folder} was trained by {saved.get('world_size')} processes, "
                                   f"this run has {world_size}; the batches would differ")
    if int(saved["step"]) > total_steps:
        raise ckpt.CheckpointError(f"{folder} is at step {saved['step']}, past this run's "
                                   f"{total_steps} steps")


def restore_checkpoint(folder: Path, saved: dict, tensors: dict, model, optimizer) -> None:
    """Put what :func:`save_checkpoint` wrote back into ``model`` and ``optimizer``, and the RNG."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    stored = {k[len("trainable."):]: v for k, v in tensors.items() if k.startswith("trainable.")}
    if stored.keys() != params.keys():
        differ = sorted(stored.keys() ^ params.keys())
        raise ckpt.CheckpointError(f"{folder}: its trainable tensors do not fit this model "
                                   f"({len(differ)} names differ, e.g. {differ[0]})")
    for name, value in stored.items():
        if params[name].shape != value.shape or params[name].dtype != value.dtype:
            raise ckpt.CheckpointError(f"{folder}: tensor {name} {tuple(value.shape)} {value.dtype} "
                                       "does not fit this model")
        with torch.no_grad():
            params[name].copy_(value)
    try:
        optimizer.load_state_dict(ckpt.optimizer_state_from_tensors(
            saved["optimizer"], tensors, optimizer.state_dict()))
        torch.set_rng_state(tensors["rng.torch"])
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise ckpt.CheckpointError(f"{folder}: the optimizer or RNG state does not fit this run "
                                   f"({exc})") from None
    cuda_states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def load_checkpoint(directory: Path, model, optimizer) -> tuple[int, list]:
    """Verify and restore a checkpoint (a folder, or the newest complete one under it).

    Returns (step, history).
    """
    folder, _ = ckpt.find_checkpoint(directory)
    saved, tensors = ckpt.read_checkpoint(folder)
    restore_checkpoint(folder, saved, tensors, model, optimizer)
    return int(saved["step"]), [tuple(h) for h in saved["history"]]


def _all_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def finetune(config: FinetuneConfig, device: str | torch.device | None = None,
             output_dir: str | os.PathLike | None = None, resume_from: str | os.PathLike | None = None,
             stop_after: int | None = None, progress: bool = True,
             evaluate_before: bool = True) -> FinetuneResult:
    """Run one fine-tuning job and return what it measured.

    Parameters
    ----------
    config : FinetuneConfig
    device : "cpu", "cuda" or None
        ``None``: CUDA when available. Asking for CUDA without a GPU is a ``RuntimeError``.
    output_dir : path, optional
        Where adapters (PEFT layout), checkpoints, ``report.md``, ``report.json`` and
        ``loss_curve.png`` go. Nothing is written without it. It is checked and
        locked (``.qlora-ref.lock``) before anything else; a second run into
        it is refused while this one runs.
    resume_from : path, optional
        A checkpoint written by an earlier run with the same config: a
        ``step-NNNNNN`` folder, the ``checkpoint`` folder (its newest complete
        one), or the earlier run's output folder. It is verified first; a
        torn one, or one made with another config or base model, is refused.
    stop_after : int, optional
        Stop (and checkpoint) after this many optimizer steps, as if interrupted.
    progress : bool
        Show a progress bar (rank 0 only).
    evaluate_before : bool
        Also evaluate the untrained model (``compare`` skips it to save time).

    Raises
    ------
    ValueError
        A bad output folder, or a checkpoint that is torn or does not fit
        (:class:`~qlora_ref.train.checkpoint.CheckpointError`).
    TrainingDiverged
        The loss became NaN or infinite; the last good checkpoint is kept.
    qlora_ref.train.checkpoint.DiskFullError
        No space left on the device; the previous checkpoint is kept.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch.cuda.is_available() is False")
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int)
                                   or stop_after < 1):
        raise ValueError(f"stop_after must be a positive integer, got {stop_after!r}")
    rank, world = _distributed()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    out = Path(output_dir) if output_dir is not None else None
    with contextlib.ExitStack() as stack:
        if rank == 0 and out is not None:
            check_output_dir(out)            # every output path, before the first step
            stack.enter_context(ckpt.output_lock(out))
        return _train(config, device, rank, world, out, resume_from, stop_after, progress,
                      evaluate_before)


def _train(config, device, rank, world, out, resume_from, stop_after, progress,
           evaluate_before) -> FinetuneResult:
    total = config.total_steps(world)
    base_sha = ckpt.sha256_file(_base_model_file(config)) if _base_model_file(config).is_file() else None
    saved, note = None, None
    if resume_from is not None:  # verified and compared before the expensive part
        folder, note = ckpt.find_checkpoint(resume_from)
        if note and rank == 0:
            print(f"qlora-ref: warning: {note}", file=sys.stderr, flush=True)
        saved, saved_tensors = ckpt.read_checkpoint(folder)
        check_resumable(saved, folder, config, total, world, base_sha)

    torch.manual_seed(config.seed)
    model = build_model(config, device)
    train_pairs = training_set(config.task, config.train_size, config.seed)
    params = trainable_parameters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, name=config.optim, lr=config.learning_rate,
                               weight_decay=config.weight_decay)
    before = tasks.evaluate(model, config.task, n=config.eval_size, device=device) \
        if rank == 0 and evaluate_before else {}
    shown = tasks.held_out(config.task, REPORT_EXAMPLES) if rank == 0 else []
    shown_before = [complete_tiny(model, p, len(a) + 1, device) if evaluate_before else None
                    for p, a in shown]

    step, history, seconds_before = 0, [], 0.0
    if saved is not None:
        restore_checkpoint(folder, saved, saved_tensors, model, optimizer)
        step, history = int(saved["step"]), [tuple(h) for h in saved["history"]]
        seconds_before = float(saved.get("train_seconds", 0.0))
    resumed_from = step
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)  # the frozen base is identical on every rank

    root = out / "checkpoint" if out is not None else None
    writer = rank == 0 and root is not None
    last_saved = None
    latest = ckpt.latest_checkpoint(root) if root is not None else None
    if saved is not None and latest is not None and latest.is_dir() \
            and latest.resolve() == folder.resolve():
        last_saved = step  # resumed from this folder's own newest checkpoint: it is already on disk

    def checkpoint(at_step, elapsed):
        nonlocal last_saved
        if not _all_finite(model):
            raise TrainingDiverged(f"the weights are not finite at step {at_step}; stopped without "
                                   f"saving. {last_good()}")
        save_checkpoint(root, model, optimizer, at_step, history, config, elapsed, world, base_sha)
        last_saved = at_step

    def last_good() -> str:
        latest = ckpt.latest_checkpoint(root) if root is not None else None
        return (f"The last good checkpoint is {latest}." if latest is not None and latest.is_dir()
                else "No checkpoint was written.")

    last = total if stop_after is None else min(total, stop_after)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = _progress(total, step, enabled=progress and rank == 0)
    started = time.perf_counter()
    model.train()
    try:
        while step < last:
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(config.gradient_accumulation_steps):
                idx = batch_indices(step, micro, config, rank, world)
                x, y, mask = tasks.encode_pairs([train_pairs[i] for i in idx], model.config.block_size)
                with _autocast(device):
                    _, loss = train_model(x.to(device), y.to(device), mask.to(device))
                (loss / config.gradient_accumulation_steps).backward()
                step_loss += loss.item() / config.gradient_accumulation_steps
            norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm) \
                if config.max_grad_norm else None
            # stop before the update: a NaN/inf loss or gradient would poison every weight it touches
            if not math.isfinite(step_loss) or (norm is not None and not bool(torch.isfinite(norm))):
                what = (f"loss became {step_loss}" if not math.isfinite(step_loss)
                        else f"gradient norm became {norm.item()}")
                raise TrainingDiverged(f"the training {what} at step {step + 1} (learning_rate="
                                       f"{config.learning_rate}, lora_alpha={config.lora_alpha}); "
                                       f"stopped before the update, nothing saved. {last_good()}")
            optimizer.step()
            step += 1
            history.append((step, step_loss))
            bar(step, step_loss)
            ckpt.fault_point("step", step)  # test hook (no-op unless QLORA_REF_FAULT_AFTER=step@N)
            if writer and config.save_steps and step % config.save_steps == 0:
                checkpoint(step, seconds_before + time.perf_counter() - started)
    finally:
        bar(None, None)
    seconds = seconds_before + time.perf_counter() - started
    model.eval()

    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    after = tasks.evaluate(model, config.task, n=config.eval_size, device=device) if rank == 0 else {}
    result = FinetuneResult(config=config, before=before, after=after, history=history,
                            parameters=dataclasses.asdict(params) if dataclasses.is_dataclass(params)
                            else dict(params), seconds=seconds, steps=step, device=str(device),
                            peak_memory_bytes=peak, output_dir=str(out) if out else None,
                            resumed_from_step=resumed_from,
                            examples=[{"prompt": p, "expected": a, "before": b,
                                       "after": complete_tiny(model, p, len(a) + 1, device)}
                                      for (p, a), b in zip(shown, shown_before)])
    if writer:
        if last_saved != step:
            checkpoint(step, seconds)
        with ckpt.disk_full_guard("the adapter and report", out,
                                  keep=f"the checkpoint {ckpt.latest_checkpoint(root)} is complete"):
            if not config.full_finetune:
                tmp = out / f".tmp-adapter-{os.getpid()}"
                try:
                    save_adapter(model, tmp)
                    ckpt.replace_directory(tmp, out / "adapter")
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            from .report import write_report

            write_report(result, out)
    result.model = model  # for callers that keep working with it (not serialised)
    return result


#: Held-out examples shown with the model's answers before and after, in the report.
REPORT_EXAMPLES = 3


@torch.no_grad()
def complete_tiny(model, prompt: str, max_new_tokens: int = 16, device=None) -> str:
    """The tiny GPT's greedy continuation of a task prompt (``tasks`` vocabulary), up to EOS."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        idx = torch.tensor([[tasks.BOS_ID] + tasks.encode(prompt)], device=device)  # (1, T)
        new = model.generate_greedy(idx, max_new_tokens)[0, idx.shape[1]:]            # (new,)
    finally:
        model.train(was_training)
    return tasks.decode(new.tolist()).split(tasks.EOS)[0]


def _progress(total: int, start: int, enabled: bool):
    """A dependency-free progress bar on stderr: ``update(step, loss)``; ``update(None, None)`` ends it."""
    t0 = time.perf_counter()

    def update(step, loss):
        if not enabled:
            return
        if step is None:
            sys.stderr.write("\n")
            sys.stderr.flush()
            return
        done = int(30 * step / total)
        rate = (step - start) / max(time.perf_counter() - t0, 1e-9)
        eta = (total - step) / rate if rate > 0 else float("nan")
        sys.stderr.write(f"\r  [{'#' * done}{'.' * (30 - done)}] step {step}/{total}  "
                         f"loss {loss:.4f}  {rate:.1f} it/s  eta {eta:4.0f}s ")
        sys.stderr.flush()

    return update
