"""QLoRA in torch: 4-bit base layers, LoRA adapters, the hand-written autograd, merging, adapters on disk.

Paper section 3, "QLoRA". One concept per module:

* :mod:`~qlora_ref.nn.functional` -- dequantization of stored codes to a torch tensor;
* :mod:`~qlora_ref.nn.autograd` -- :class:`QLoRAMatmul`, forward and hand-written backward;
* :mod:`~qlora_ref.nn.quantized`, :mod:`~qlora_ref.nn.linear4bit`,
  :mod:`~qlora_ref.nn.linear8bit` -- frozen base layers that dequantize themselves;
* :mod:`~qlora_ref.nn.lora` -- :class:`LoRALinear` and the one LoRA formula;
* :mod:`~qlora_ref.nn.merge` -- three ways to merge, measured;
* :mod:`~qlora_ref.nn.model` -- :func:`prepare_model`, :func:`trainable_parameters`;
* :mod:`~qlora_ref.nn.targets` -- which modules a name or pattern selects, at a bounded cost;
* :mod:`~qlora_ref.nn.adapters` -- PEFT-compatible :func:`save_adapter` / :func:`load_adapter`;
* :mod:`~qlora_ref.nn.saved4bit` -- a 4-bit model saved once in bitsandbytes' layout
  (:func:`save_quantized`) and loaded without quantizing again (:func:`load_quantized`);
* :mod:`~qlora_ref.nn.decode` -- :class:`LlamaDecoder`, a lean greedy decoder (static KV cache,
  one 4-bit matmul per shared input) whose readable twin is transformers' ``generate``.
"""
from .adapters import load_adapter, save_adapter
from .autograd import QLoRAMatmul, dropout_mask, frozen_weight, qlora_linear
from .functional import (dequantize_4bit_torch, dequantize_absmax_torch, dequantize_blockwise_torch,
                         quant_state_tensors, to_quant_state)
from .linear4bit import Linear4bit
from .linear8bit import Linear8bit
from .lora import LoRALinear, delta_weight, freeze_base, lora_scaling, low_rank_factors
from .merge import (MERGE_STRATEGIES, MergeError, merge_and_unload, merge_errors, merge_lora,
                    merged_weight)
from .model import ParameterCount, find_target_modules, prepare_model, trainable_parameters
from .quantized import QuantizedLinear
from .saved4bit import load_quantized, quantize_model, save_quantized
from .decode import LlamaDecoder, unsupported_reason

__all__ = [
    "Linear4bit", "Linear8bit", "QuantizedLinear", "LoRALinear", "QLoRAMatmul", "qlora_linear",
    "frozen_weight", "dropout_mask", "dequantize_4bit_torch", "dequantize_absmax_torch",
    "dequantize_blockwise_torch", "quant_state_tensors", "to_quant_state", "delta_weight",
    "lora_scaling", "low_rank_factors", "freeze_base", "MERGE_STRATEGIES", "MergeError",
    "merged_weight", "merge_lora", "merge_and_unload", "merge_errors", "prepare_model",
    "trainable_parameters", "find_target_modules", "ParameterCount", "save_adapter",
    "load_adapter", "save_quantized", "load_quantized", "quantize_model", "LlamaDecoder",
    "unsupported_reason",
]
