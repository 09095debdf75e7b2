r"""The one training loop: optimizer steps with accumulation, clipping, checkpoints, resume, divergence.

Both fine-tuning jobs run here, the tiny GPT on a generated task
(:mod:`qlora_ref.train.finetune`) and a Hugging Face causal LM on a JSONL
file (:mod:`qlora_ref.train.hf_finetune`); each hands the loop a
:class:`Trainee` (the model made trainable, and the loss of a micro-batch
given its example indices). Paper section 4's recipe, for each optimizer
step:

.. math::

    \mathbf g = \frac{1}{K}\sum_{k=1}^{K} \nabla_{\theta}\,
        \mathcal L(\text{micro-batch}_k), \qquad
    \mathbf g \leftarrow \mathbf g \cdot \min\Bigl(1, \frac{c}{\lVert\mathbf g\rVert_2}\Bigr),
    \qquad \theta \leftarrow \operatorname{AdamW}(\mathbf g)

with :math:`K` = ``gradient_accumulation_steps``, :math:`c` =
``max_grad_norm`` and :math:`\theta` the LoRA adapters (or every weight
with ``full_finetune``). A non-finite loss or :math:`\lVert\mathbf g\rVert`
stops the run before the update (:class:`TrainingDiverged`). Under
``torchrun`` each rank takes its own slice of every batch and
DistributedDataParallel averages the gradients; with ``fsdp`` the model is
sharded with FSDP2 instead (:func:`qlora_ref.distributed.shard_model`: each
rank keeps ``1/N`` of the 4-bit base and of the adapters), trained with
``torch.optim.AdamW``, and checkpointed with DCP
(:mod:`qlora_ref.train.sharded_checkpoint`).

The examples are read in a new order each epoch, a function of the seed and
the epoch only (:func:`batch_indices`), so a checkpoint's data position is
its step count: a resumed run replays exactly the batches an uninterrupted
run would have seen, and ends with byte-equal adapters.

Faults (see :mod:`qlora_ref.train.checkpoint`): every input and output path
is checked before anything is created; the output folder is locked; a
checkpoint is switched into place only when complete and is verified, and
its configuration and input files (by sha256) compared with the run's,
before a resume; a full disk is reported as one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .. import _atomic
from ..nn import prepare_model, save_adapter
from ..optim import make_optimizer
from . import checkpoint as ckpt
from .config import FinetuneConfig
from .resume import (FINGERPRINTS, check_resumable, read_resume,  # noqa: F401  (loop.X)
                     restore_checkpoint, save_checkpoint)

__all__ = ["Trainee", "TrainState", "FinetuneResult", "TrainingDiverged", "train", "run_outputs", "start_run",
           "check_output_dir", "locked_output", "read_resume", "make_trainable", "batch_indices",
           "resolve_device", "check_stop_after", "distributed", "compute_dtype", "save_checkpoint",
           "check_resumable", "restore_checkpoint", "progress_bar", "check_fsdp", "whole_adapters",
           "prepare_kwargs",
           "RESULTS"]

#: What a finished run leaves in its output folder: a new run into it is refused without
#: ``overwrite`` (or ``resume``), as ``transformers``' scripts do without ``--overwrite_output_dir``.
RESULTS = ("adapter", "model", "report.json", "checkpoint")


class TrainingDiverged(RuntimeError):
    """The training loss (or the gradient norm) became NaN or infinite."""


@dataclasses.dataclass
class Trainee:
    """What the loop trains: a model made trainable, and the loss of one micro-batch.

    ``micro_batch_loss(model, indices)`` returns the mean loss over the loss
    tokens of the training examples ``indices`` and the number of those
    tokens, ``(loss, count)`` (``model`` is the one to call: under torchrun
    the DistributedDataParallel wrapper; the count weighs the ranks' means,
    :func:`_one_step`). ``fingerprints`` maps
    :data:`FINGERPRINTS` keys to ``(sha256, path)`` of the run's inputs.
    ``save_full(model, folder)`` writes a fully fine-tuned model into a new
    folder; ``adapter_kwargs`` go to :func:`qlora_ref.nn.save_adapter`.
    """

    model: torch.nn.Module
    micro_batch_loss: Callable[[torch.nn.Module, np.ndarray], torch.Tensor]
    fingerprints: dict = dataclasses.field(default_factory=dict)
    adapter_kwargs: dict = dataclasses.field(default_factory=dict)
    save_full: Optional[Callable[[torch.nn.Module, Path], None]] = None


@dataclasses.dataclass
class TrainState:
    """Where the loop is: optimizer steps done, the loss of each, and the time they took."""

    steps: int = 0
    history: list = dataclasses.field(default_factory=list)  #: [(step, training loss)]
    seconds: float = 0.0     #: training time of all ``steps``, a resumed-from part included
    resumed_from: int = 0    #: the checkpoint's step when resumed, else 0
    peak_memory_bytes: Optional[int] = None


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


# ----------------------------------------------------------------------------- device and model

def resolve_device(device) -> torch.device:
    """``None``: CUDA when available; asking for CUDA without a GPU is a ``RuntimeError``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch.cuda.is_available() is False")
    return device


def check_stop_after(stop_after) -> None:
    """``stop_after`` is None or a positive integer (steps before stopping as if interrupted)."""
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int)
                                   or stop_after < 1):
        raise ValueError(f"stop_after must be a positive integer, got {stop_after!r}")


def distributed(device: torch.device, fsdp: bool = False) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device) under torchrun, else (0, 1, device).

    With ``fsdp`` a process group is required (``torchrun``, even with one
    process): without ``WORLD_SIZE`` it is a one-line ``ValueError``.
    """
    if fsdp and "WORLD_SIZE" not in os.environ:
        raise ValueError("--fsdp shards the model over the processes torchrun starts: run "
                         "`torchrun --nproc-per-node N -m qlora_ref.cli finetune --fsdp ...`")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not fsdp:
        return 0, 1, device
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
    return rank, world, device


def check_fsdp(config: FinetuneConfig) -> None:
    """Refuse (one line) what ``fsdp`` cannot train: full fine-tuning, 8-bit bases, PagedAdamW."""
    if config.full_finetune:
        raise ValueError("--fsdp shards a QLoRA (or LoRA) model; --full-finetune is not "
                         "supported with --fsdp")
    if config.quant_bits == 8:
        raise ValueError("--fsdp shards 4-bit and 16-bit bases; --quant-bits 8 is not supported "
                         "with --fsdp")
    if config.optim != "adamw":
        raise ValueError(f"--fsdp trains with torch.optim.AdamW (its sharded state is what DCP "
                         f"saves); optim={config.optim!r} pages whole tensors: use --optim adamw")


def compute_dtype(config: FinetuneConfig, device: torch.device) -> torch.dtype:
    """The matmul dtype of a quantized base: the config's, else float32 on CPU, bfloat16 on CUDA."""
    if config.bnb_4bit_compute_dtype:
        return getattr(torch, config.bnb_4bit_compute_dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def make_trainable(model: torch.nn.Module, config: FinetuneConfig, device) -> torch.nn.Module:
    """Full fine-tuning: every weight in float32 trains. Else quantize the base and add LoRA."""
    if config.full_finetune:  # float32 master weights; the matmuls run in bf16 autocast on CUDA
        return model.float().requires_grad_(True).to(device)
    return prepare_model(model, **prepare_kwargs(config, device)).to(device)


def prepare_kwargs(config: FinetuneConfig, device) -> dict:
    """The keyword arguments of :func:`qlora_ref.prepare_model` that ``config`` asks for."""
    return dict(
        r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        quant_type=config.bnb_4bit_quant_type if config.quant_bits == 4 else None,
        double_quant=config.bnb_4bit_use_double_quant, quant_bits=config.quant_bits,
        compute_dtype=compute_dtype(config, torch.device(device)) if config.quant_bits != 16 else None,
        init=config.init_lora_weights)


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


# ----------------------------------------------------------------------------- the output folder

def start_run(config, device, stop_after, fsdp: bool, output_dir, overwrite: bool, resuming: bool):
    """What both jobs check first, before anything is loaded or created.

    Returns ``(rank, world, device, out, writer)``: the process's rank and the
    world size (torchrun, else 0 and 1), the device it trains on, the output
    folder (or None) and whether this process writes it (rank 0 with a folder),
    which :func:`check_output_dir` has then already checked.
    """
    device = resolve_device(device)
    check_stop_after(stop_after)
    if fsdp:
        check_fsdp(config)
    rank, world, device = distributed(device, fsdp)
    out = Path(output_dir) if output_dir is not None else None
    writer = rank == 0 and out is not None
    if writer:
        check_output_dir(out, overwrite=overwrite, resuming=resuming)
    return rank, world, device, out, writer


def check_output_dir(out, overwrite: bool = False, resuming: bool = False) -> None:
    """Refuse, creating nothing, an output folder the run cannot or must not write.

    Raises ``ValueError`` (one line) when ``out`` or a part of its path is a
    file, is not writable, lies inside the installed package, when a path
    the run writes is of the wrong kind or a symbolic link, or when it holds
    an earlier run's results (:data:`RESULTS`) and neither ``overwrite`` nor
    ``resuming`` is given.
    """
    out = Path(out)
    _atomic.refuse_inside_package(out, "--output-dir")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {out} exists and is not a directory")
    existing = out.absolute()
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot create output directory {out}: a part of its path is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output directory {existing} is not writable")
    for name in ("adapter", "model", "checkpoint"):
        _atomic.refuse_symlink(out / name, "output folder")
        if (out / name).exists() and not (out / name).is_dir():
            raise ValueError(f"{out / name} exists and is not a directory; the run writes a folder there")
    for name in ("report.md", "report.json", "loss_curve.png"):
        if (out / name).is_dir():
            raise ValueError(f"{out / name} is a directory; the run writes a file there")
    found = [name for name in RESULTS if (out / name).exists()]
    if found and not (overwrite or resuming):
        raise ValueError(f"{out} holds an earlier run's {found[0]}; pass --overwrite to replace "
                         f"it, --resume {out} to continue it, or choose another --output-dir")


@contextlib.contextmanager
def locked_output(out: Optional[Path], writer: bool, clear_checkpoints: bool = False):
    """Lock the output folder for the run; yields ``ready()``, to call once the inputs are loaded.

    An existing folder is locked at once (a second run is refused before it
    loads anything); a new one is created and locked by ``ready()``, so a run
    whose model fails to load leaves nothing behind. ``clear_checkpoints``
    (``overwrite`` without resume): ``ready()`` deletes the earlier run's
    ``checkpoint`` folder, whose steps must not mix with the new run's.
    """
    with contextlib.ExitStack() as stack:
        locked = False
        if writer and out is not None and out.is_dir():
            stack.enter_context(ckpt.output_lock(out))
            locked = True

        def ready():
            nonlocal locked
            if not writer or out is None:
                return
            if not locked:
                out.mkdir(parents=True, exist_ok=True)
                stack.enter_context(ckpt.output_lock(out))
                locked = True
            if clear_checkpoints:
                _clear_checkpoints(out / "checkpoint")

        yield ready


def _clear_checkpoints(root: Path) -> None:
    """Delete what :mod:`~qlora_ref.train.checkpoint` writes in ``root`` (``--overwrite``); nothing else."""
    if not root.is_dir() or root.is_symlink():
        return
    for entry in root.iterdir():
        if entry.name in (ckpt.LATEST, ckpt.LATEST + ".tmp") and not entry.is_dir():
            entry.unlink()
        elif entry.is_dir() and not entry.is_symlink() and re.match(r"step-\d+$|\.(tmp|old)-", entry.name):
            shutil.rmtree(entry)
    from .sharded_checkpoint import clear_staging

    clear_staging(root)  # a killed --fsdp save's DCP staging folder


# ----------------------------------------------------------------------------- checkpoints

class _Saver:
    """The checkpoint writer of one run; remembers the last step it (or the resumed run) saved.

    Rank 0's alone, or with ``fsdp`` every rank's (the save is a collective).
    """

    def __init__(self, out: Optional[Path], trainee: Trainee, optimizer, config, world: int,
                 resumed=None, fsdp: bool = False, rank: int = 0):
        self.root = out / "checkpoint" if out is not None else None
        self.trainee, self.optimizer, self.config, self.world = trainee, optimizer, config, world
        self.fsdp, self.rank = fsdp, rank
        self.last_saved = None
        latest = ckpt.latest_checkpoint(self.root) if self.root is not None else None
        if resumed is not None and latest is not None and latest.is_dir() \
                and latest.resolve() == Path(resumed[0]).resolve():
            self.last_saved = int(resumed[1]["step"])  # resumed from our own newest: already on disk

    def save(self, state: TrainState, seconds: float) -> None:
        model = self.trainee.model
        finite = all(bool(torch.isfinite(_local(p)).all()) for p in model.parameters()
                     if p.requires_grad)
        if self.fsdp:  # each rank sees its own shards: all must agree before the collective save
            import torch.distributed as dist

            bad = torch.tensor([0 if finite else 1])
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            finite = not bad.item()
        if not finite:
            raise TrainingDiverged(f"the weights are not finite at step {state.steps}; stopped "
                                   f"without saving. {self.last_good()}")
        if self.fsdp:
            from .sharded_checkpoint import save_sharded_checkpoint

            fingerprints = {key: sha for key, (sha, _) in self.trainee.fingerprints.items()}
            save_sharded_checkpoint(
                self.root, state.steps, model, self.optimizer,
                {"history": state.history, "config": dataclasses.asdict(self.config),
                 "world_size": self.world, "train_seconds": seconds, **fingerprints},
                self.rank, self.trainee.adapter_kwargs)
            self.last_saved = state.steps
            return
        save_checkpoint(self.root, model, self.optimizer, state.steps, state.history, self.config,
                        seconds, self.world, self.trainee.fingerprints, self.trainee.adapter_kwargs)
        self.last_saved = state.steps

    def last_good(self) -> str:
        latest = ckpt.latest_checkpoint(self.root) if self.root is not None else None
        return (f"The last good checkpoint is {latest}." if latest is not None and latest.is_dir()
                else "No checkpoint was written.")


# ----------------------------------------------------------------------------- the loop

def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a sharded tensor (a ``DTensor``), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def whole_adapters(model, fsdp: bool):
    """A context in which the adapters are whole tensors (a collective with ``fsdp``; else nothing)."""
    if not fsdp:
        return contextlib.nullcontext(model)
    from ..distributed import gathered_adapters

    return gathered_adapters(model)


def _one_step(train_model, trainee: Trainee, optimizer, trainable: list, config, step: int,
              rank: int, world: int, device) -> tuple[float, float]:
    r"""Accumulate the gradients of one optimizer step and clip them: (mean loss, gradient norm).

    Under torchrun rank :math:`r` holds :math:`n_r` of the :math:`n` loss
    tokens of a micro-batch, and DDP / FSDP2 average the ranks' gradients,
    so each rank scales its mean loss :math:`\bar{\ell}_r` by
    :math:`N n_r / n`:

    .. math::

        \frac{1}{N}\sum_r \nabla \Bigl(\frac{N n_r}{n}\,\bar{\ell}_r\Bigr)
            = \nabla\,\frac{1}{n}\sum_{\text{tokens}} \ell ,

    the gradient of the micro-batch's token mean as one process computes
    it (one process: the factor is exactly 1). The norm is always computed
    (``inf`` as the bound when ``max_grad_norm`` is off, which scales by
    exactly 1): an infinite gradient must be seen even when the loss is finite.
    """
    optimizer.zero_grad(set_to_none=True)
    step_loss, k = 0.0, config.gradient_accumulation_steps
    for micro in range(k):
        idx = batch_indices(step, micro, config, rank, world)
        with _autocast(device):
            loss, count = trainee.micro_batch_loss(train_model, idx)
        if world > 1:
            import torch.distributed as dist

            both = torch.tensor([float(count), float(count) * loss.item()], dtype=torch.float64)
            dist.all_reduce(both)  # (n, sum of the token losses) of the global micro-batch
            loss = loss * (world * float(count) / max(float(both[0]), 1.0))
            step_loss += float(both[1]) / max(float(both[0]), 1.0) / k
        else:
            step_loss += loss.item() / k
        (loss / k).backward()
    norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm or math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2: the norm of all ranks' shards, a DTensor
        norm = norm.full_tensor()
    return step_loss, float(norm)


def _check_finite(loss: float, norm: float, step: int, config, saver: Optional[_Saver]) -> None:
    """Stop before the update: a NaN/inf loss or gradient would poison every weight it touches."""
    if math.isfinite(loss) and math.isfinite(norm):
        return
    what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient norm became {norm}"
    where = saver.last_good() if saver is not None else "No checkpoint was written."
    raise TrainingDiverged(f"the training {what} at step {step + 1} (learning_rate="
                           f"{config.learning_rate}, lora_alpha={config.lora_alpha}); stopped "
                           f"before the update, nothing saved. {where}")


def _ddp(model, device, world: int):
    if world <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)  # the frozen base is the same everywhere


def train(trainee: Trainee, config: FinetuneConfig, device, out: Optional[Path] = None,
          resumed: Optional[tuple] = None, stop_after: Optional[int] = None, progress: bool = True,
          rank: int = 0, world: int = 1, fsdp: bool = False) -> TrainState:
    """Train ``trainee.model`` for ``config.total_steps(world)`` steps (or ``stop_after``).

    ``resumed`` is :func:`read_resume`'s answer; checkpoints go to
    ``out/checkpoint`` (rank 0, when ``out`` is given; with ``fsdp`` every
    rank writes its shards) every ``config.save_steps`` steps and at the end.
    With ``fsdp`` the model is sharded first
    (:func:`qlora_ref.distributed.shard_model`, in place) and stays sharded.
    Returns the :class:`TrainState`; the model is left in eval mode.
    """
    model = trainee.model
    if fsdp:
        from torch.distributed.fsdp import FSDPModule

        from ..distributed import shard_model

        if not isinstance(model, FSDPModule):  # load_sharded already gave a sharded model
            shard_model(model)  # in place: trainee.model is now an FSDPModule
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, name=config.optim, lr=config.learning_rate,
                               weight_decay=config.weight_decay)
    state = TrainState()
    if resumed is not None:
        folder, saved, tensors = resumed
        if fsdp:
            from .sharded_checkpoint import restore_sharded_checkpoint

            restore_sharded_checkpoint(folder, saved, tensors, model, optimizer, rank)
        else:
            restore_checkpoint(folder, saved, tensors, model, optimizer)
        state = TrainState(steps=int(saved["step"]), history=[tuple(h) for h in saved["history"]],
                           seconds=float(saved.get("train_seconds", 0.0)), resumed_from=int(saved["step"]))
    saver = _Saver(out, trainee, optimizer, config, world, resumed, fsdp, rank) \
        if out and (rank == 0 or fsdp) else None
    train_model = model if fsdp else _ddp(model, device, world)
    total = config.total_steps(world)
    last = total if stop_after is None else min(total, stop_after)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = progress_bar(total, state.steps, progress and rank == 0)
    started, before = time.perf_counter(), state.seconds
    model.train()
    try:
        while state.steps < last:
            loss, norm = _one_step(train_model, trainee, optimizer, trainable, config, state.steps,
                                   rank, world, device)
            _check_finite(loss, norm, state.steps, config, saver)
            optimizer.step()
            state.steps += 1
            state.history.append((state.steps, loss))
            bar(state.steps, loss)
            ckpt.fault_point("step", state.steps)  # test hook (no-op unless QLORA_REF_FAULT_AFTER)
            if saver and config.save_steps and state.steps % config.save_steps == 0:
                saver.save(state, before + time.perf_counter() - started)
    finally:
        bar(None, None)
    state.seconds = before + time.perf_counter() - started
    state.peak_memory_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    model.eval()
    if saver and saver.last_saved != state.steps:
        saver.save(state, state.seconds)
    return state


# ----------------------------------------------------------------------------- results

def run_outputs(result: FinetuneResult, trainee: Trainee, out: Path) -> None:
    """Write the run's result into ``out``: ``adapter/`` (or ``model/``), then the report.

    Each folder is written beside its place and switched in whole; a full
    disk is one :class:`~qlora_ref.train.checkpoint.DiskFullError` line.
    """
    latest = ckpt.latest_checkpoint(out / "checkpoint")
    keep = f"the checkpoint {latest} is complete" if latest else "no earlier result was replaced"
    with ckpt.disk_full_guard("the adapter and report", out, keep=keep):
        name = "model" if result.config.full_finetune else "adapter"
        if name == "adapter":  # save_adapter swaps the folder in whole (qlora_ref._atomic)
            save_adapter(trainee.model, out / name, **trainee.adapter_kwargs)
        elif trainee.save_full is not None:
            with _atomic.atomic_directory(out / name) as tmp:
                trainee.save_full(trainee.model, tmp)
        from .report import write_report

        write_report(result, out)


def progress_bar(total: int, start: int, enabled: bool):
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
