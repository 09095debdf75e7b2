"""QLoRA past one device: the 4-bit base sharded with PyTorch's FSDP2, and DCP checkpoints.

See ``docs/multi_gpu.md`` for the recipe; :mod:`qlora_ref.train.sharded_checkpoint`
holds the checkpoints of ``qlora-ref finetune --fsdp``. Everything here runs on CPU with the
gloo backend as on CUDA with NCCL.
"""
from .checkpoint import SafeFileSystemReader, adapter_state, load_checkpoint, save_checkpoint
from .fsdp import (base_bytes, check_shardable, decoder_blocks, gathered_adapters, shard_model,
                   unsharded)
from .loading import load_sharded

__all__ = ["shard_model", "load_sharded", "check_shardable", "decoder_blocks", "base_bytes", "unsharded",
           "gathered_adapters", "save_checkpoint", "load_checkpoint", "adapter_state",
           "SafeFileSystemReader"]
