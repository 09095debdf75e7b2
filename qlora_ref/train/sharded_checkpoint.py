r"""The training loop's checkpoints when the model is sharded (``qlora-ref finetune --fsdp``).

A checkpoint of a sharded run is the same ``step-NNNNNN`` folder as any
other (:mod:`qlora_ref.train.checkpoint`: manifest, ``LATEST``, published
whole), with the trainable state in DCP's layout in a ``dcp/`` folder::

    step-000010/
      dcp/                          .metadata, __0_0.distcp, __1_0.distcp, ... (every rank's shards
                                    of the adapters and of their AdamW state; see
                                    qlora_ref.distributed.checkpoint)
      training_state.safetensors    rng.torch.<rank>: each rank's CPU RNG state
      trainer_state.json            step, loss history, config, world size, "sharded": "dcp"
      adapter/                      the adapters in PEFT's layout, written by rank 0
      manifest.json                 bytes + sha256 of every file above, dcp/ included

Saving is a collective: every rank writes its shards into
``checkpoint/.dcp-step-NNNNNN`` (a staging folder beside the step folders),
then rank 0 writes the rest with :func:`qlora_ref.train.checkpoint.save_checkpoint`,
whose ``write_extra`` hook moves the staging folder into the new step folder
(one ``rename`` in the same file system) before the manifest is computed. So
the DCP shards are published with the folder, atomically: a kill at any
moment leaves ``LATEST`` naming a complete checkpoint, and at most a staging
folder, which the next save (or ``--overwrite``) deletes.

Note (what resumes exactly): each rank gets its own RNG state back and DCP
its own shards, so a run resumed on the same process count continues byte
for byte. On another count DCP reads the slices of the new shards (the
bytes are the same), the global batch is kept (``per_device_train_batch_size
* N`` must be equal), and what changes is how the batch mean is summed:
each rank averages its own examples' loss and FSDP2 averages the ranks'
gradients, so the adapters agree to float32 rounding when every rank's
micro-batch has the same number of loss tokens, and otherwise differ by the
different weighting of the tokens (as DistributedDataParallel does); with
``lora_dropout`` the ranks draw other dropout masks.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from .. import _atomic
from ..distributed.checkpoint import load_checkpoint, save_checkpoint as save_dcp
from ..distributed.fsdp import gathered_adapters
from . import checkpoint as ckpt

__all__ = ["save_sharded_checkpoint", "restore_sharded_checkpoint", "agree", "DCP_FOLDER",
           "SHARDED_FORMAT", "clear_staging"]

DCP_FOLDER = "dcp"
#: ``trainer_state.json``'s ``sharded`` value for a checkpoint of this module.
SHARDED_FORMAT = "dcp"
_STAGING = re.compile(r"^\.dcp-step-\d{6}$")
_DCP_FILE = re.compile(r"^(\.metadata|__\d+_\d+\.distcp)$")


def agree(error: BaseException | None, what: str) -> None:
    """A collective: raise ``error`` where it happened, and a one-line error on the other ranks.

    Without it a rank whose write failed would leave the others waiting in
    the next collective until the process group's timeout.
    """
    failed = torch.tensor([0 if error is None else 1])
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError(f"another process failed while {what} (its error is above)")


def clear_staging(root: Path) -> None:
    """Delete the staging folders a killed save left in ``root``: ours only (DCP's files and nothing else)."""
    if not root.is_dir() or root.is_symlink():
        return
    for entry in root.iterdir():
        if not _STAGING.match(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        if all(_DCP_FILE.match(f.name) and f.is_file() and not f.is_symlink()
               for f in entry.iterdir()):
            shutil.rmtree(entry)


def _rng_states() -> list[torch.Tensor]:
    """Every rank's CPU RNG state, on every rank (they have one size: an all-gather)."""
    mine = torch.get_rng_state()
    states = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(states, mine)
    return states


def save_sharded_checkpoint(root: Path, step: int, model, optimizer, trainer_state: dict,
                            rank: int, adapter_kwargs: dict | None = None) -> Path | None:
    """Write the checkpoint of ``step`` of a sharded ``model`` under ``root`` (a collective).

    Returns the new ``step-NNNNNN`` folder on rank 0, None on the others.
    """
    from ..nn import save_adapter

    root = Path(root)
    staging = root / f".dcp-step-{step:06d}"
    error = None
    if rank == 0:
        try:
            _atomic.refuse_symlink(root, "checkpoint folder")
            root.mkdir(parents=True, exist_ok=True)
            clear_staging(root)
        except Exception as exc:  # noqa: BLE001 - re-raised by agree()
            error = exc
    agree(error, f"preparing checkpoint step-{step:06d}")
    save_dcp(model, optimizer, staging)          # collective: each rank writes its shards
    rng = _rng_states()                          # collective
    folder = None
    with gathered_adapters(model):               # collective: only the adapters are gathered
        if rank == 0:
            def write_extra(tmp: Path) -> None:
                os.rename(staging, tmp / DCP_FOLDER)  # published with the step folder
                save_adapter(model, tmp / "adapter", **(adapter_kwargs or {}))

            try:
                tensors = {f"rng.torch.{r}": state for r, state in enumerate(rng)}
                folder = ckpt.save_checkpoint(root, step, tensors,
                                              {**trainer_state, "sharded": SHARDED_FORMAT},
                                              write_extra)
            except BaseException as exc:  # noqa: BLE001 - a DiskFullError, a kill signal...
                error = exc
    agree(error, f"saving checkpoint step-{step:06d}")
    return folder


def restore_sharded_checkpoint(folder: Path, saved: dict, tensors: dict, model, optimizer,
                               rank: int) -> None:
    """Load a verified checkpoint of :func:`save_sharded_checkpoint` into a sharded model (a collective)."""
    try:
        load_checkpoint(model, optimizer, Path(folder) / DCP_FOLDER)
    except ValueError as exc:
        raise ckpt.CheckpointError(str(exc)) from None
    same_count = int(saved.get("world_size", 1)) == dist.get_world_size()
    key = f"rng.torch.{rank}" if same_count else "rng.torch.0"
    if key not in tensors:
        raise ckpt.CheckpointError(f"{folder}: its training state has no {key}")
    torch.set_rng_state(tensors[key])
