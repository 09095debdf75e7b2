r"""``shard_model``: a QLoRA model sharded over N processes with PyTorch's FSDP2.

Paper section 3 puts a 65B model on one 48 GB GPU; past one GPU the 4-bit
base is the largest term left, and a plain DistributedDataParallel copy keeps
all of it on every rank. Fully sharded data parallelism (FSDP, Zhao et al.
2023; here torch's FSDP2, ``torch.distributed.fsdp.fully_shard``) keeps
:math:`1/N` of every parameter on each rank and all-gathers one block's
parameters just before its forward (and again before its backward):

.. math::

    \text{base bytes per rank} = \frac{1}{N}\sum_{\text{layers}}
        \Big(\tfrac{\text{out}\cdot\text{in}}{2} + \text{absmax} + \text{nested absmax}\Big)
        \;+\; \text{code tables and offset (replicated)} .

What is all-gathered is the *stored* weight -- the packed uint8 codes and
the quantization constants -- never a dequantized one, so the traffic is
4.1 bits per weight and the layer dequantizes exactly the bytes the
unsharded layer holds (:meth:`~qlora_ref.nn.Linear4bit.hold_as_parameters`).

Note (which extension point): torchao's ``NF4Tensor`` is the ``weight``
parameter of an ``nn.Linear``, one tensor holding codes and scalers, so it
implements FSDP2's ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` to
split itself into the uint8 pieces to gather. Our
:class:`~qlora_ref.nn.Linear4bit` already keeps those pieces as separate
tensors, so each becomes a frozen ``nn.Parameter`` and FSDP2 gathers them as
they are (mixed dtypes travel as bytes: ``foreach_all_gather`` views them as
uint8). No tensor subclass, no code of ours on the communication path.

Note (mixed precision): FSDP2's ``MixedPrecisionPolicy(param_dtype=...)``
would round the float32 constants of a layer without double quantization
(FSDP2 casts every floating parameter). :func:`shard_model` applies no
policy; a quantized layer computes in its ``compute_dtype`` instead.

Note (split in whole blocks): FSDP2 splits every parameter along dim 0 in
``N`` equal pieces. ``packed`` (``out*in/2`` bytes, row-major) and ``absmax``
(one constant per ``blocksize`` weights) are split at the same weight iff
``out*in`` is a multiple of ``N * blocksize``; :func:`shard_model` requires
it, so each rank holds whole blocks and their own constants. The small
``nested_absmax`` (one float per 256 blocks) may end in a padded piece.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn

from ..nn.linear4bit import Linear4bit
from ..nn.lora import LoRALinear
from ..nn.quantized import QuantizedLinear

__all__ = ["shard_model", "check_shardable", "decoder_blocks", "base_bytes", "unsharded",
           "gathered_adapters", "FSDP_VERSION_NOTE"]

#: What was used and tested: FSDP2 as in torch 2.13 (``torch.distributed.fsdp.fully_shard``).
FSDP_VERSION_NOTE = "torch.distributed.fsdp.fully_shard (FSDP2), gloo on CPU, NCCL on CUDA"


def _require_process_group(what: str) -> int:
    """The world size, or a ``RuntimeError`` saying how to start the processes."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{what} needs torch.distributed to be initialized: start the "
                           "processes with torchrun (or call torch.distributed."
                           "init_process_group('gloo' on CPU, 'nccl' on CUDA)) first")
    return dist.get_world_size()


def decoder_blocks(model: nn.Module) -> list[str]:
    """The names of the repeated blocks to shard one by one: the children of the ``nn.ModuleList`` with most LoRA layers.

    That list is the decoder stack in every model we meet (``blocks`` of the
    tiny GPT, ``model.layers`` of Llama, ``transformer.h`` of GPT-2).
    """
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            count = sum(isinstance(m, LoRALinear) for m in module.modules())
            if count > best_count:
                best, best_count = name, count
    if best is None:
        return []
    return [f"{best}.{i}" if best else str(i) for i in range(len(model.get_submodule(best)))]


def check_shardable(model: nn.Module, world_size: int) -> None:
    """Raise ``ValueError`` naming the first base layer FSDP2 cannot split in whole blocks."""
    if not any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model has no LoRALinear layers: call qlora_ref.prepare_model "
                         "before shard_model")
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear) and not isinstance(module, Linear4bit):
            raise ValueError(f"'{name}' is a {module.bits}-bit base: shard_model splits 4-bit "
                             "and 16-bit bases only")
        if isinstance(module, Linear4bit):
            n = module.weight_numel
            if n % (world_size * module.blocksize):
                raise ValueError(
                    f"{module.label()}: {world_size} shards do not divide its "
                    f"{-(-n // module.blocksize)} blocks of {module.blocksize} weights "
                    f"({n} weights; each rank must hold whole blocks): use a process count "
                    f"that divides {n // module.blocksize if n % module.blocksize == 0 else 1}")


def shard_model(model: nn.Module, blocks: list[str] | None = None,
                reshard_after_forward: bool = True, mesh=None) -> nn.Module:
    r"""Shard a prepared QLoRA model over the processes of the default group with FSDP2.

    Call after :func:`~qlora_ref.prepare_model` (and after moving the model to
    its device), on every rank, with the same model. Each 4-bit base first
    holds its codes and constants as frozen parameters
    (:meth:`~qlora_ref.nn.Linear4bit.hold_as_parameters`); then
    ``fully_shard`` wraps each decoder block and, last, the root, the recipe
    of the FSDP2 tutorial. Build the optimizer *afterwards*, from
    ``[p for p in model.parameters() if p.requires_grad]`` (the adapters,
    now ``DTensor`` shards).

    Parameters
    ----------
    model : nn.Module
        A model from :func:`~qlora_ref.prepare_model`; changed in place and returned.
    blocks : list of str, optional
        Module names to wrap one by one (default :func:`decoder_blocks`).
    reshard_after_forward : bool
        FSDP2's: free the gathered block after its forward and gather it
        again for the backward (the memory saving); False keeps it to the backward.
    mesh : DeviceMesh, optional
        FSDP2's; default the whole world, 1-D.

    Returns
    -------
    nn.Module
        ``model``, now an ``FSDPModule``.

    Raises
    ------
    RuntimeError
        No process group (not started under ``torchrun``).
    ValueError
        No LoRA layers, an 8-bit base, or a process count that does not
        divide a layer's blocks.
    """
    from torch.distributed.fsdp import fully_shard

    world_size = _require_process_group("shard_model")
    if mesh is not None:
        world_size = mesh.size()
    check_shardable(model, world_size)
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.hold_as_parameters()
    names = decoder_blocks(model) if blocks is None else list(blocks)
    for name in names:
        fully_shard(model.get_submodule(name), mesh=mesh,
                    reshard_after_forward=reshard_after_forward)
    # the root: embeddings, final norm, head; kept gathered from forward to backward
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


def _local_nbytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def base_bytes(model: nn.Module) -> dict:
    """Bytes of the 4-bit bases this rank holds: ``{"sharded": ..., "replicated": ..., "total": ...}``.

    ``sharded`` counts this rank's pieces of ``packed``, ``absmax`` and
    ``nested_absmax`` (FSDP2's padding included); ``replicated`` the code
    tables and offsets every rank keeps; ``total`` the sum of the layers'
    :attr:`~qlora_ref.nn.Linear4bit.nbytes` unsharded (code tables excluded, as there).
    """
    sharded = replicated = total = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            for name in module.SHARDABLE:
                t = getattr(module, name)
                if t is not None:
                    sharded += _local_nbytes(t)
                    full = t.shape.numel() * t.element_size()
                    total += full
            for name in ("code", "nested_code", "offset"):
                t = getattr(module, name)
                if t is not None:
                    replicated += t.numel() * t.element_size()
            total += 4 if module.double_quant else 0  # the offset, as in nbytes
    return {"sharded": sharded, "replicated": replicated, "total": total}


def _fsdp_modules(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def unsharded(model: nn.Module):
    """Inside the block, every parameter of a sharded ``model`` is whole (all-gathered) on every rank.

    A collective: enter it on all ranks. What reads the model as one piece
    works unchanged inside -- :func:`~qlora_ref.save_adapter` on rank 0,
    :meth:`~qlora_ref.nn.Linear4bit.dequantize`, a comparison with the
    unsharded model. The shards are restored on exit. No gradients flow.
    """
    modules = _fsdp_modules(model)
    if not modules:
        raise ValueError("unsharded(model): the model is not sharded (call shard_model first)")
    with torch.no_grad():
        for m in modules:
            m.unshard()
        try:
            yield model
        finally:
            for m in modules:
                m.reshard()


@contextmanager
def gathered_adapters(model: nn.Module):
    """Inside the block, the adapters of a sharded ``model`` are whole on every rank; the base stays sharded.

    A collective: enter it on all ranks. Made for reading the adapters as one
    piece -- :func:`~qlora_ref.save_adapter` on rank 0 -- at the cost of one
    copy of the adapters, where :func:`unsharded` would gather the 4-bit base
    too. Each LoRA parameter is all-gathered (``DTensor.full_tensor``) and
    put in its module's place; the sharded parameter is put back on exit.
    Run no forward or backward inside (FSDP2's hooks expect their own parameters).
    """
    from ..nn.lora import LoRALinear

    _require_process_group("gathered_adapters")
    swapped = []
    try:
        with torch.no_grad():
            for module in model.modules():
                if not isinstance(module, LoRALinear):
                    continue
                for name, p in list(module._parameters.items()):
                    if p is not None and p.requires_grad and hasattr(p, "full_tensor"):
                        full = nn.Parameter(p.full_tensor(), requires_grad=False)  # collective
                        module._parameters[name] = full
                        swapped.append((module, name, p))
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p
