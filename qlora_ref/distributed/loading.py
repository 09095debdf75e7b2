r"""``load_sharded``: build a sharded QLoRA model from a weights file, one layer at a time.

:func:`~qlora_ref.distributed.shard_model` shards a model every rank has
already loaded and quantized whole, so while loading each rank holds the
whole float model. Here the model never exists whole on any rank:

1. the skeleton is built with its parameters on the ``meta`` device (no
   memory, no random numbers drawn); buffers (rotary tables, ...) are real;
2. each layer LoRA targets, in :func:`~qlora_ref.nn.prepare_model`'s order,
   reads only its own float weight from the safetensors file, is quantized
   and given adapters by the same call ``prepare_model`` makes
   (``LoRALinear.from_linear``: the same bytes, the same draws from torch's
   generator), and keeps only this rank's piece of each parameter; the
   float layer is freed before the next one is read;
3. every other parameter (embeddings, norms, head) is read, and this
   rank's piece kept;
4. ``fully_shard`` wraps the (still ``meta``) model as ``shard_model`` does,
   ``to_empty`` allocates each rank's shards, and the kept pieces are
   copied in.

Peak memory per rank while loading:

.. math::

    \underbrace{\tfrac{1}{N}\,\text{model}}_{\text{pieces kept}}
    + \underbrace{\text{one float layer} + \text{its 4-bit copy}}_{\text{being quantized}}
    + \text{the largest other tensor (read whole)} .

The piece of rank :math:`r` is FSDP2's ``Shard(0)``: ``torch.chunk(t, N)[r]``
along the first dimension (empty past the last chunk), exactly what
``fully_shard`` keeps of a whole tensor, so the result is byte-equal to
``shard_model(prepare_model(model))`` on every rank (``tests/distributed/test_fsdp2.py``).

Note (quantize the whole layer): the quantization constants are per block of
``blocksize`` weights of the flattened weight, and :func:`check_shardable`'s
rule (``out*in`` a multiple of ``N * blocksize``) makes every rank's piece of
``packed`` and ``absmax`` whole blocks. Quantizing only this rank's rows would
give the same codes and first-level constants, but the double quantization's
``offset`` is the mean of *all* the layer's constants, so it needs the whole
layer; and LoftQ needs the whole weight. One float layer at a time is the
price, and ``from_linear`` is then the very call ``prepare_model`` makes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from .._atomic import regular_file_path
from ..nn.saved4bit import parameters_on_meta as params_on_meta  # noqa: F401  (this module's API)
from ..nn.model import find_target_modules, prepare_model, replace_module
from .fsdp import _require_process_group, check_shardable, decoder_blocks

__all__ = ["load_sharded", "params_on_meta"]


class _Weights:
    """The tensors of a safetensors file, or of a folder's ``model.safetensors`` (or its index), read one by one."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            single = path / "model.safetensors"
            if _regular(index):
                weight_map = json.loads(index.read_text())["weight_map"]
                self.files = {k: _checked(path / v, path) for k, v in weight_map.items()}
            elif _regular(single):
                self.files = None
                self._single = single
            else:
                raise ValueError(f"{path}: no model.safetensors (or its index) in the folder; "
                                 "load_sharded reads safetensors weights only")
        else:
            self.files, self._single = None, _checked(path, path.parent)
        if self.files is None:
            from safetensors import safe_open
            with regular_file_path(self._single, "weights") as name, \
                    safe_open(name, framework="pt") as f:
                self.files = {k: self._single for k in f.keys()}

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open
        with regular_file_path(self.files[key], "weights") as name, \
                safe_open(name, framework="pt") as f:
            return f.get_tensor(key)  # this tensor only


def _regular(path: Path) -> bool:
    return path.is_file()


def _checked(path: Path, folder: Path) -> Path:
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file (a weights file of {folder})")
    return path


def _piece(t: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s piece of ``t`` under FSDP2's ``Shard(0)``: ``torch.chunk(t, world)[rank]``, a copy."""
    if t.dim() == 0:
        return t.detach().clone()
    chunks = torch.chunk(t.detach(), world, dim=0)
    if rank < len(chunks):
        return chunks[rank].clone()
    return t.new_empty((0, *t.shape[1:]))  # past the last chunk: FSDP2 pads, holds nothing


class _Pieces:
    """Each parameter's piece for this rank, keyed by the (module, name) pairs that hold it."""

    def __init__(self, world: int, rank: int):
        self.world, self.rank, self.pieces = world, rank, {}

    def keep(self, module: nn.Module, name: str, value: torch.Tensor, aliases=()) -> None:
        """Keep this rank's piece of ``value``; put a ``meta`` parameter in its place (and its aliases')."""
        old = module._parameters[name]
        meta = nn.Parameter(torch.empty_like(value, device="meta"),
                            requires_grad=old.requires_grad)
        piece = _piece(value, self.world, self.rank)
        for owner, leaf in [(module, name), *aliases]:
            owner._parameters[leaf] = meta
            self.pieces[(id(owner), leaf)] = piece

    def fill(self, model: nn.Module) -> None:
        """Copy the kept pieces into the shards ``to_empty`` allocated (each shared parameter once)."""
        done = set()
        with torch.no_grad():
            for mname, module in model.named_modules(remove_duplicate=False):
                for leaf, p in module._parameters.items():
                    if p is None or id(p) in done:
                        continue
                    done.add(id(p))
                    local = p.to_local() if hasattr(p, "to_local") else p
                    piece = self.pieces.get((id(module), leaf))
                    if piece is None or tuple(piece.shape) != tuple(local.shape):
                        raise RuntimeError(
                            f"load_sharded: {mname}.{leaf}: this rank's shard has shape "
                            f"{tuple(local.shape)}, the piece read for it "
                            f"{None if piece is None else tuple(piece.shape)}")
                    local.copy_(piece)
        self.pieces.clear()


def _tied(model: nn.Module) -> dict:
    """``{id(parameter): [(module, leaf name, full name), ...]}``, ties (shared parameters) included."""
    owners = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for leaf, p in module._parameters.items():
            if p is not None:
                full = f"{mname}.{leaf}" if mname else leaf
                entry = owners.setdefault(id(p), [])
                if all(m is not module or l != leaf for m, l, _ in entry):
                    entry.append((module, leaf, full))
    return owners


def _read(weights: _Weights, names: list, like: torch.Tensor, where) -> torch.Tensor:
    found = next((n for n in names if n in weights), None)
    if found is None:
        raise ValueError(f"{where}: no tensor {names[0]!r} in the weights file (a checkpoint of "
                         "another model, or keys that need renaming: load it with "
                         "from_pretrained and use prepare_model + shard_model)")
    t = weights.get(found)
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"{where}: {found!r} has shape {tuple(t.shape)} in the weights file, "
                         f"{tuple(like.shape)} in the model")
    return t.to(like.dtype)


def load_sharded(build, weights: str | os.PathLike | None = None, *, blocks: list | None = None,
                 reshard_after_forward: bool = True, mesh=None, device="cpu",
                 dtype=torch.float32, **prepare_kwargs) -> nn.Module:
    r"""A QLoRA model sharded with FSDP2, read and quantized one layer at a time (module docstring).

    Equal, byte for byte on every rank, to::

        model = <build the model, weights from the file>
        shard_model(prepare_model(model, **prepare_kwargs), blocks, reshard_after_forward, mesh)

    with torch's random generator in the same state at the call (the adapters'
    initial values are drawn in the same order). A collective: call on every rank.

    Parameters
    ----------
    build : callable or path
        A function of no arguments returning the model (its parameters are
        made on ``meta``: their initial values are never computed), or a
        Hugging Face model folder (``config.json`` + safetensors): then the
        model is ``AutoModelForCausalLM.from_config(config, dtype=dtype)``,
        in eval mode, as :func:`~qlora_ref.train.hf_finetune.load_model` loads it.
    weights : path, optional
        A ``.safetensors`` file, or a folder with ``model.safetensors`` or its
        index; its keys are the model's ``state_dict`` names. Default: ``build``
        when it is a folder.
    blocks, reshard_after_forward, mesh
        As for :func:`~qlora_ref.distributed.shard_model`.
    device : str or torch.device
        Where the shards live (``"cpu"``; ``"cuda"`` after ``torch.cuda.set_device``).
    dtype : torch.dtype
        The float dtype of a model built from a folder (the file's tensors are cast to it).
    **prepare_kwargs
        :func:`~qlora_ref.nn.prepare_model`'s (``r``, ``lora_alpha``, ``init``, ...).

    Raises
    ------
    RuntimeError
        No process group.
    ValueError
        A tensor missing from the file or of another shape, a process count
        that does not divide a layer's blocks, an 8-bit base, or ``build``
        not a model folder.
    """
    from torch.distributed.fsdp import fully_shard
    import torch.distributed as dist

    world = _require_process_group("load_sharded")
    rank = dist.get_rank()
    if mesh is not None:
        world, rank = mesh.size(), mesh.get_local_rank()
    if prepare_kwargs.get("quant_bits") == 8:
        raise ValueError("load_sharded shards 4-bit and 16-bit bases; quant_bits=8 is not supported")
    model = _skeleton(build, dtype)
    if weights is None:
        if callable(build):
            raise ValueError("load_sharded(build, weights): pass the weights file when build "
                             "is a function")
        weights = build
    weights = _Weights(weights)
    _check_divisible(model, world, prepare_kwargs)

    pieces = _Pieces(world, rank)
    owners = _tied(model)
    names = find_target_modules(model, prepare_kwargs.get("target_modules", "all-linear"))
    targets = set(names)
    modules = dict(model.named_modules())
    kwargs = {k: v for k, v in prepare_kwargs.items() if k != "target_modules"}
    model.requires_grad_(False)  # as prepare_model: only the adapters train
    # 2. the LoRA layers, in prepare_model's order (the adapters' random draws)
    for name in names:
        _load_layer(model, name, modules.pop(name), weights, pieces, kwargs)
    # 3. everything else, each tied (shared) parameter once
    for entries in owners.values():
        module, leaf, full = entries[0]
        p = module._parameters.get(leaf)
        if p is None or not p.is_meta or any(f.rpartition(".")[0] in targets for _, _, f in entries):
            continue  # done above: a target layer's own weight or bias
        value = _read(weights, [f for _, _, f in entries], p, full)
        pieces.keep(module, leaf, value, aliases=[(m, lf) for m, lf, _ in entries[1:]])
        del value
    # 4. shard as shard_model does (still on meta), allocate the shards, fill them
    check_shardable(model, world)
    buffers = [(m, n, b) for m in model.modules() for n, b in m._buffers.items() if b is not None]
    for bname in (decoder_blocks(model) if blocks is None else list(blocks)):
        fully_shard(model.get_submodule(bname), mesh=mesh,
                    reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    model.to_empty(device=device)
    for module, bname, b in buffers:  # to_empty emptied the buffers too
        module._buffers[bname] = b.to(device)
    pieces.fill(model)
    return model if callable(build) else model.eval()


def _load_layer(model, name, linear, weights, pieces, kwargs) -> None:
    """Read one target layer whole, quantize it and add adapters as prepare_model does, keep this rank's pieces."""
    for leaf, p in list(linear._parameters.items()):  # the float layer, whole, for a moment
        if p is not None:
            linear._parameters[leaf] = nn.Parameter(_read(weights, [f"{name}.{leaf}"], p, name),
                                                    requires_grad=False)
    layer = prepare_model(linear, **kwargs)  # the call prepare_model makes for this layer
    layer.name = layer.base_layer.name = name
    replace_module(model, name, layer)
    if hasattr(layer.base_layer, "hold_as_parameters"):
        layer.base_layer.hold_as_parameters()
    for module in layer.modules():
        for leaf, p in list(module._parameters.items()):
            if p is not None:
                pieces.keep(module, leaf, p)
    for leaf, p in list(linear._parameters.items()):  # _tied's list still names this module
        if p is not None:
            linear._parameters[leaf] = nn.Parameter(p.to("meta"), requires_grad=False)
    # returning frees the float weight and the whole 4-bit layer


def _skeleton(build, dtype) -> nn.Module:
    """The model with its parameters on ``meta``; torch's random generator left as it was."""
    with torch.random.fork_rng(devices=[]), params_on_meta():
        if callable(build):
            return build()
        folder = Path(build)
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder}: not a model folder (no config.json); pass a function "
                             "that builds the model and the weights file")
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _check_divisible(model: nn.Module, world: int, prepare_kwargs: dict) -> None:
    """``check_shardable``'s rule, on the float skeleton, before anything is read."""
    bits = prepare_kwargs.get("quant_bits") or (16 if prepare_kwargs.get("quant_type", "nf4")
                                                is None else 4)
    if bits != 4:
        return
    blocksize = prepare_kwargs.get("blocksize") or 64
    modules = dict(model.named_modules())
    for name in find_target_modules(model, prepare_kwargs.get("target_modules", "all-linear")):
        n = modules[name].weight.numel()
        if n % (world * blocksize):
            raise ValueError(f"{name}: {world} shards do not divide its {-(-n // blocksize)} "
                             f"blocks of {blocksize} weights ({n} weights; each rank must hold "
                             "whole blocks)")
