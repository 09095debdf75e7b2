"""Saving a training run's state and taking it up again: what :mod:`qlora_ref.train.loop` checkpoints.

:func:`save_checkpoint` gathers the trainable weights, the optimizer's state
and the random-number generators' states into one checkpoint
(:mod:`qlora_ref.train.checkpoint` writes it); :func:`read_resume` finds,
verifies and compares one with this run's settings; :func:`restore_checkpoint`
puts it back into a model and optimizer. A resumed run then continues the
same sequence of batches and random draws, so its adapters equal an
uninterrupted run's.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from ..nn import save_adapter
from . import checkpoint as ckpt
from .config import RESUMABLE_CHANGES, FinetuneConfig

__all__ = ["save_checkpoint", "check_resumable", "read_resume", "restore_checkpoint", "FINGERPRINTS"]

#: The sha256 fingerprints a checkpoint records, and what they are of (for the refusal line).
FINGERPRINTS = {"base_model_sha256": "base model", "dataset_sha256": "data file"}


def save_checkpoint(directory: Path, model, optimizer, step: int, history: list,
                    config: FinetuneConfig, seconds: float = 0.0, world_size: int = 1,
                    fingerprints: Optional[dict] = None, adapter_kwargs: Optional[dict] = None) -> Path:
    """Write a checkpoint of ``step`` under ``directory`` (see :mod:`qlora_ref.train.checkpoint`).

    Tensors (trainable weights, optimizer moments, RNG states) go to one
    safetensors file; the step, loss history, config, input fingerprints,
    the optimizer's parameter groups and the training time so far to JSON;
    the adapters in PEFT layout beside them. Returns the new ``step-NNNNNN`` folder.
    """
    tensors = {f"trainable.{n}": p.detach().cpu().clone()
               for n, p in model.named_parameters() if p.requires_grad}
    optimizer_tensors, optimizer_index = ckpt.optimizer_state_to_tensors(optimizer.state_dict())
    tensors.update(optimizer_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    state = {"history": history, "config": dataclasses.asdict(config), "world_size": world_size,
             "train_seconds": seconds, "optimizer": optimizer_index,
             **{key: sha for key, (sha, _) in (fingerprints or {}).items()}}
    write_adapter = None if config.full_finetune else (
        lambda folder: save_adapter(model, folder / "adapter", **(adapter_kwargs or {})))
    return ckpt.save_checkpoint(Path(directory), step, tensors, state, write_adapter)


def check_resumable(saved: dict, folder: Path, config: FinetuneConfig, total_steps: int,
                    world_size: int = 1, fingerprints: Optional[dict] = None,
                    fsdp: bool = False) -> None:
    """Refuse to resume a checkpoint made with another configuration, input file or world size.

    Only the fields in :data:`RESUMABLE_CHANGES` may differ (and the paths of
    ``CONTENT_FIELDS``, whose files are compared by sha256); the error names
    the first other one. Input files are compared first: another data file
    also changes ``train_size``, and the file is the clearer thing to name.
    A sharded (``fsdp``) checkpoint resumes only with ``fsdp``, and on any
    process count with the same global batch (``per_device_train_batch_size``
    times the process count); any other only on the same count.
    """
    mine = json.loads(json.dumps(dataclasses.asdict(config)))  # as the checkpoint stored it
    theirs = saved.get("config")
    if not isinstance(theirs, dict):
        raise ckpt.CheckpointError(f"{folder / ckpt.TRAINER_STATE} holds no configuration")
    for key, (sha, path) in (fingerprints or {}).items():
        old = saved.get(key)
        if old and sha and old != sha:
            raise ckpt.CheckpointError(
                f"{folder} was trained on another {FINGERPRINTS[key]} (sha256 {old[:12]}...), "
                f"this run's {path} has sha256 {sha[:12]}...")
    sharded = saved.get("sharded") is not None
    if sharded != fsdp:
        raise ckpt.CheckpointError(f"{folder} was written by a run {'with' if sharded else 'without'}"
                                   f" --fsdp; resume it {'with' if sharded else 'without'} --fsdp")
    defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(config)}))
    saved_world = int(saved.get("world_size", 1))
    if fsdp:
        old = theirs.get("per_device_train_batch_size", defaults["per_device_train_batch_size"])
        if old * saved_world != config.batch_size * world_size:
            raise ckpt.CheckpointError(
                f"{folder} was trained by {saved_world} processes of {old} examples a "
                f"micro-batch, this run has {world_size} of {config.batch_size}; keep the global "
                f"batch: --batch-size {old * saved_world / world_size:g}")
    for name, value in mine.items():
        if name in RESUMABLE_CHANGES or name in type(config).CONTENT_FIELDS:
            continue
        if fsdp and name == "per_device_train_batch_size":
            continue  # compared as the global batch above
        old = theirs.get(name, defaults[name])
        if old != value:
            raise ckpt.CheckpointError(
                f"{folder} was trained with {name}={old!r}, this run has {name}={value!r}; "
                f"resume with the same {name} or start a new run")
    if saved_world != world_size and not fsdp:
        raise ckpt.CheckpointError(f"{folder} was trained by {saved.get('world_size')} processes, "
                                   f"this run has {world_size}; the batches would differ")
    if int(saved["step"]) > total_steps:
        raise ckpt.CheckpointError(f"{folder} is at step {saved['step']}, past this run's "
                                   f"{total_steps} steps")


def read_resume(resume_from, config: FinetuneConfig, world: int, fingerprints: dict,
                rank: int = 0, fsdp: bool = False) -> tuple:
    """Find, verify, read and compare the checkpoint ``resume_from`` names: (folder, state, tensors)."""
    folder, note = ckpt.find_checkpoint(resume_from)
    if note and rank == 0:
        print(f"qlora-ref: warning: {note}", file=sys.stderr, flush=True)
    saved, tensors = ckpt.read_checkpoint(folder)
    check_resumable(saved, folder, config, config.total_steps(world), world, fingerprints, fsdp)
    if rank == 0:
        ckpt.adopt_checkpoint(folder)  # deleted in turn once two newer checkpoints exist
    return folder, saved, tensors


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
    ckpt.check_optimizer_fits(saved["optimizer"], tensors, optimizer)  # moments' shapes, first
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
