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
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..nn import prepare_model, save_adapter, trainable_parameters
from ..optim import make_optimizer
from . import tasks
from .pretrain import default_base_model_path, load_base_model

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "load_config", "CONFIG_ALIASES"]

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
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
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


def load_config(path: str | os.PathLike, name: str, **overrides) -> FinetuneConfig:
    """Read the named configuration from a JSON file of ``{name: {field: value}}``.

    Unknown fields are an error that lists the known ones; ``lora_r`` is
    accepted for ``r``, and ``learning_rate``-style names as in
    :class:`FinetuneConfig`. ``overrides`` win over the file.
    """
    path = Path(path)
    try:
        configs = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no config file at {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if name not in configs:
        raise ValueError(f"{path} has no configuration {name!r}; it has: {', '.join(configs)}")
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    values = {}
    for key, value in configs[name].items():
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
    values.update({k: v for k, v in overrides.items() if v is not None})
    return FinetuneConfig(**values)


@dataclasses.dataclass
class FinetuneResult:
    """What a run measured: before/after evaluation, the loss curve, sizes and timings."""

    config: FinetuneConfig
    before: dict
    after: dict
    history: list           #: [(step, training loss)]
    parameters: dict        #: trainable / total parameters, base bytes 4-bit vs 16-bit
    seconds: float
    steps: int
    device: str
    peak_memory_bytes: Optional[int] = None
    output_dir: Optional[str] = None

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


def _trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(directory: Path, model, optimizer, step: int, history: list,
                    config: FinetuneConfig) -> None:
    """Adapters (PEFT layout and raw), optimizer state, and the data position (the step)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"trainable": _trainable_state(model), "optimizer": optimizer.state_dict(),
                "torch_rng": torch.get_rng_state()}, directory / "training_state.pt")
    (directory / "trainer_state.json").write_text(json.dumps(
        {"step": step, "history": history, "config": dataclasses.asdict(config)}, indent=1))
    if not config.full_finetune:
        save_adapter(model, directory / "adapter")


def load_checkpoint(directory: Path, model, optimizer) -> tuple[int, list]:
    """Restore what :func:`save_checkpoint` wrote; returns (step, history)."""
    directory = Path(directory)
    state_file = directory / "training_state.pt"
    if not state_file.is_file():
        raise FileNotFoundError(f"no checkpoint in {directory} (missing training_state.pt)")
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    for name, value in state["trainable"].items():
        if name not in params or params[name].shape != value.shape:
            raise ValueError(f"checkpoint tensor {name} {tuple(value.shape)} does not fit this model")
        with torch.no_grad():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    meta = json.loads((directory / "trainer_state.json").read_text())
    return int(meta["step"]), [tuple(h) for h in meta["history"]]


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
        ``loss_curve.png`` go. Nothing is written without it.
    resume_from : path, optional
        A checkpoint folder written by an earlier run with the same config.
    stop_after : int, optional
        Stop (and checkpoint) after this many optimizer steps, as if interrupted.
    progress : bool
        Show a progress bar (rank 0 only).
    evaluate_before : bool
        Also evaluate the untrained model (``compare`` skips it to save time).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch.cuda.is_available() is False")
    rank, world = _distributed()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.manual_seed(config.seed)
    out = Path(output_dir) if output_dir is not None else None

    model = build_model(config, device)
    train_pairs = training_set(config.task, config.train_size, config.seed)
    params = trainable_parameters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, name=config.optim, lr=config.learning_rate,
                               weight_decay=config.weight_decay)
    before = tasks.evaluate(model, config.task, n=config.eval_size, device=device) \
        if rank == 0 and evaluate_before else {}

    step, history = 0, []
    if resume_from is not None:
        step, history = load_checkpoint(Path(resume_from), model, optimizer)
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)  # the frozen base is identical on every rank

    total = config.total_steps(world)
    last = total if stop_after is None else min(total, stop_after)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = _progress(total, step, enabled=progress and rank == 0)
    started = time.perf_counter()
    model.train()
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
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        step += 1
        history.append((step, step_loss))
        bar(step, step_loss)
        if rank == 0 and out is not None and config.save_steps and step % config.save_steps == 0:
            save_checkpoint(out / "checkpoint", model, optimizer, step, history, config)
    bar(None, None)
    seconds = time.perf_counter() - started
    model.eval()

    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    after = tasks.evaluate(model, config.task, n=config.eval_size, device=device) if rank == 0 else {}
    result = FinetuneResult(config=config, before=before, after=after, history=history,
                            parameters=dataclasses.asdict(params) if dataclasses.is_dataclass(params)
                            else dict(params), seconds=seconds, steps=step, device=str(device),
                            peak_memory_bytes=peak, output_dir=str(out) if out else None)
    if rank == 0 and out is not None:
        save_checkpoint(out / "checkpoint", model, optimizer, step, history, config)
        if not config.full_finetune:
            save_adapter(model, out / "adapter")
        from .report import write_report

        write_report(result, out)
    result.model = model  # for callers that keep working with it (not serialised)
    return result


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
