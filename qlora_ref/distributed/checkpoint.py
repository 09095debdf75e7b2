r"""Checkpoints of a sharded QLoRA run: adapters and optimizer state with ``torch.distributed.checkpoint``.

Only the adapters train, so a checkpoint holds them and their optimizer
state (AdamW: ``step``, :math:`m`, :math:`v` per adapter), each rank writing
its own shards (DCP, ``torch.distributed.checkpoint``); the 4-bit base is
rebuilt from the model and is not saved. DCP records every tensor's global
shape, so a run saved on :math:`N` processes resumes on :math:`N'`: each rank
reads the slices of its new shards.

Note (reading is safe): DCP stores its index (``.metadata``) with ``pickle``.
We read it with an unpickler that only rebuilds DCP's own metadata classes,
torch's dtype / size / layout objects and a path (:class:`SafeFileSystemReader`),
so a file that asks for anything else is refused before it can run code. The
tensor files are read by DCP with torch's weights-only loader; the few
plain values (the optimizer's learning rate, betas, ...), which DCP itself
would read with the full unpickler, we read with the weights-only loader too
(``_SafeLoadPlanner``).

Note (what resumes exactly): on the same ``N`` the shards come back as they
were saved, so the run continues byte for byte. On another ``N`` the state is
the same bytes, but the gradient all-reduce then sums over a different split
of the batch; the adapters agree to float32 rounding of that sum.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .fsdp import _require_process_group

__all__ = ["save_checkpoint", "load_checkpoint", "SafeFileSystemReader", "adapter_state"]


def adapter_state(model: nn.Module) -> dict:
    """``{name: parameter}`` of the parameters that train (the adapters), as DCP saves them."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _state(model: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    state = {"adapters": adapter_state(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_checkpoint(model: nn.Module, optimizer, directory: str | os.PathLike) -> Path:
    """Write the adapters (and ``optimizer``'s state, if given) of a sharded ``model`` to ``directory``.

    A collective: call on every rank. Each rank writes its own shards; the
    folder is DCP's layout (``.metadata`` plus one ``__<rank>_0.distcp`` per rank).
    """
    import torch.distributed.checkpoint as dcp
    _require_process_group("save_checkpoint")
    directory = Path(directory)
    dcp.save(_state(model, optimizer), checkpoint_id=directory)
    return directory


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP's metadata and nothing else (see the module note)."""

    _TORCH = {"Size", "device", "contiguous_format", "channels_last", "preserve_format"}
    _BUILTINS = {"set", "frozenset", "slice", "complex", "bytearray"}
    _DCP_MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"}
    _OTHERS = {("collections", "OrderedDict"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
               ("torch.serialization", "_get_layout")}  # the checkpoint path; a layout's name

    def find_class(self, module, name):
        # no dotted names: pickle would walk ``a.b`` attribute by attribute (``os.system``)
        if "." not in name and (module, name) in self._OTHERS:
            return super().find_class(module, name)
        if "." not in name and module in self._DCP_MODULES:
            found = super().find_class(module, name)
            # only the classes DCP defines there (dataclasses and enums of its index), never a
            # function or a module that file happens to import
            if isinstance(found, type) and found.__module__ == module:
                return found
        if module == "torch" and (name in self._TORCH
                                  or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if module == "builtins" and name in self._BUILTINS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata asks for {module}.{name}, which a "
                                     "DCP index never holds: refused (not a DCP checkpoint?)")


def _filesystem_reader():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """DCP's ``FileSystemReader``, reading ``.metadata`` with :class:`_MetadataUnpickler`."""

        def read_metadata(self, *args, **kwargs):
            path = Path(self._get_metadata_path(kwargs.get("rank")))
            if path.is_symlink() or not path.is_file():
                raise ValueError(f"{path}: not a regular file (a DCP checkpoint folder has one "
                                 "'.metadata' file)")
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader


def SafeFileSystemReader(path):  # noqa: N802 -- a factory named as the class it builds
    """DCP's ``FileSystemReader`` for ``path`` that refuses any metadata but DCP's (module note)."""
    return _filesystem_reader()(path)


def _safe_load_planner():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class _SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's planner, reading non-tensor values with ``torch.load(weights_only=True)``."""

        def load_bytes(self, read_item, value):
            obj = torch.load(value, weights_only=True)
            fqn = read_item.dest_index.fqn
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return _SafeLoadPlanner()


def _check_matches(reader, state: dict, directory: Path) -> None:
    """Raise ``ValueError`` with the first difference between the checkpoint and the model."""
    saved = reader.read_metadata().state_dict_metadata
    adapters = {k for k in saved if k.startswith("adapters.")}
    mine = {f"adapters.{k}": tuple(v.shape) for k, v in state["adapters"].items()}
    missing = sorted(set(mine) - adapters)
    extra = sorted(adapters - set(mine))
    if missing or extra:
        raise ValueError(f"{directory}: the checkpoint does not match the model's adapters: "
                         + (f"missing {missing[:3]}" if missing else "")
                         + ("; " if missing and extra else "")
                         + (f"unexpected {extra[:3]}" if extra else "")
                         + " (saved from another model or other target modules?)")
    for key, shape in mine.items():
        got = tuple(getattr(saved[key], "size", ()))
        if got != shape:
            raise ValueError(f"{directory}: {key[len('adapters.'):]} has shape {got} in the "
                             f"checkpoint, {shape} in the model (another r or model size?)")
    if "optimizer" in state and not any(k.startswith("optimizer.") for k in saved):
        raise ValueError(f"{directory}: the checkpoint holds no optimizer state")


def load_checkpoint(model: nn.Module, optimizer, directory: str | os.PathLike) -> None:
    """Load what :func:`save_checkpoint` wrote into a sharded ``model`` (and ``optimizer``), in place.

    A collective: call on every rank, after :func:`~qlora_ref.distributed.shard_model`
    and after building the optimizer. The process count may differ from the
    saving run's. A checkpoint of other adapters (names or shapes) is a
    ``ValueError`` naming the first difference, before anything changes.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    _require_process_group("load_checkpoint")
    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise ValueError(f"{directory}: not a checkpoint folder (no '.metadata'; written by "
                         "qlora_ref.distributed.save_checkpoint?)")
    reader = SafeFileSystemReader(directory)
    state = _state(model, optimizer)
    _check_matches(reader, state, directory)
    dcp.load(state, storage_reader=reader, planner=_safe_load_planner())
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    dist.barrier()
