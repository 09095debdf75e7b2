r"""Memory accounting: bits per parameter, bytes per tensor, bytes per fine-tuning run.

Paper: Dettmers et al. (2023), "QLoRA: Efficient Finetuning of Quantized LLMs".

* Section 3, "4-bit NormalFloat Quantization" and "Double Quantization": what one
  stored weight costs, quantization constants included (:func:`bits_per_param`,
  :func:`quantized_nbytes`). With blocksize 64 the float32 constants
  :math:`c_2` add 32/64 = 0.5 bits per weight; double quantization stores
  :math:`c_2` in 8 bits plus one float32 :math:`c_1` per 256 of them,
  8/64 + 32/(64 * 256) ≈ 0.127 bits, saving 0.373 bits per parameter.
* Section 1 (">780 GB of GPU memory" for regular 16-bit finetuning of a 65B
  model), Section 2, "Memory Requirement of Parameter-Efficient Finetuning"
  (LoRA weights of "0.2 %" of the model, input gradients, gradient
  checkpointing), and Appendix G's memory breakdown of LLaMA 7B to 65B
  (Figure 6): what a whole run costs (:func:`finetune_memory`,
  :func:`memory_table`, :func:`activation_memory`).

Notation (one table for the whole package: ``docs/notation.md``): as in the
paper, :math:`c_2` are the first-level constants (one absmax per block of
:math:`B = 64` weights) and :math:`c_1` the second-level float32 constants
that double quantization adds (one per :math:`B_{c_2} = 256` values of
:math:`c_2`). Bit *widths* are never called :math:`c`: they are
:math:`k` (a code), :math:`b_\mathrm{f}` (``absmax_bits``, a float32
constant) and :math:`b_\mathrm{q}` (``nested_absmax_bits``, a quantized
:math:`c_2`).

The byte layout mirrors ``bitsandbytes.functional.quantize_4bit`` (and
``quantize_blockwise`` for 8 bits): packed codes, one absmax per block and,
with ``compress_statistics=True``, the absmax quantized to uint8 in blocks of
256 with their own float32 absmax, plus one float32 ``offset`` (the mean
absmax, subtracted before the second quantization).

Units: every count is in bytes, as a Python ``int``; "GB" means 1e9 bytes, the
unit of the paper's 780 GB and 48 GB figures (:func:`format_bytes` also knows GiB).

Note (what is not counted): the code tables (16 NF4 values, the 256-value
dynamic map of the nested absmax) are shared constants and not counted, although
bitsandbytes writes a copy of them when it serializes a tensor. Activations
depend on batch size, sequence length and gradient checkpointing: they are 0
unless given, either as bytes or through a model shape and ``seq_len``
(:func:`activation_memory`). Paged optimizers (the paper's third idea) move
memory to the CPU on spikes; they change no totals here.

The accounting is split by idea: :mod:`~qlora_ref.memory.storage` (one
tensor), :mod:`~qlora_ref.memory.shapes` (model shapes and LoRA counts),
:mod:`~qlora_ref.memory.activations` and :mod:`~qlora_ref.memory.tables`
(a whole run); every name is importable from here.
"""
from __future__ import annotations

from .activations import ActivationMemory, activation_memory
from .shapes import (DEFAULT_LORA_FRACTION, LLAMA_65B, LLAMA_SHAPES, PROJECTIONS, DecoderShape,
                     generic_lora_param_count, lora_param_count, shape_from_config)
from .storage import BLOCKWISE_BITS, PLAIN_BITS, bits_per_param, quantized_nbytes
from .tables import (METHODS, MemoryComparison, MemoryTable, finetune_memory, format_bytes,
                     fsdp_memory, fsdp_memory_table, memory_table)

__all__ = [
    "fsdp_memory",
    "fsdp_memory_table",
    "shape_from_config",
    "BLOCKWISE_BITS",
    "PLAIN_BITS",
    "METHODS",
    "PROJECTIONS",
    "LLAMA_65B",
    "DecoderShape",
    "LLAMA_SHAPES",
    "DEFAULT_LORA_FRACTION",
    "bits_per_param",
    "quantized_nbytes",
    "lora_param_count",
    "generic_lora_param_count",
    "format_bytes",
    "ActivationMemory",
    "activation_memory",
    "MemoryTable",
    "MemoryComparison",
    "finetune_memory",
    "memory_table",
]
