"""The public API does not shrink: every name the package exported before the house was
rearranged (issue 24; the ``__all__`` lists of commit 236a958) still imports, from the
same place, and is still listed in that module's ``__all__``.

New names may be added; a name may only go with a deliberate edit of this list.
"""
import importlib

import pytest

#: module -> the names it exported at 236a958 (``python -c "import m; print(sorted(m.__all__))"``)
PUBLIC = {
    "qlora_ref": [
        "QuantState", "active_backend", "cython_available", "dequantize_4bit",
        "dequantize_4bit_torch", "dequantize_blockwise", "double_dequantize", "double_quantize",
        "dynamic_code", "fp4_code", "from_bitsandbytes", "from_linear4bit_state_dict", "int4_code",
        "load_adapter", "memory", "merge_and_unload", "nf4_code", "nn", "normal_float_code",
        "optim", "pack_nibbles", "prepare_model", "quantize_4bit", "quantize_blockwise",
        "save_adapter", "to_bitsandbytes", "to_linear4bit_state_dict", "trainable_parameters",
        "unpack_nibbles"],
    "qlora_ref.nn": [
        "Linear4bit", "Linear8bit", "LoRALinear", "MERGE_STRATEGIES", "MergeError",
        "ParameterCount", "QLoRAMatmul", "QuantizedLinear", "delta_weight", "dequantize_4bit_torch",
        "dequantize_absmax_torch", "dequantize_blockwise_torch", "dropout_mask",
        "find_target_modules", "freeze_base", "frozen_weight", "load_adapter", "lora_scaling",
        "low_rank_factors", "merge_and_unload", "merge_errors", "merge_lora", "merged_weight",
        "prepare_model", "qlora_linear", "quant_state_tensors", "save_adapter", "to_quant_state",
        "trainable_parameters"],
    "qlora_ref.memory": [
        "ActivationMemory", "BLOCKWISE_BITS", "DEFAULT_LORA_FRACTION", "DecoderShape", "LLAMA_65B",
        "LLAMA_SHAPES", "METHODS", "MemoryComparison", "MemoryTable", "PLAIN_BITS", "PROJECTIONS",
        "activation_memory", "bits_per_param", "finetune_memory", "format_bytes",
        "generic_lora_param_count", "lora_param_count", "memory_table", "quantized_nbytes"],
    "qlora_ref.optim": ["OPTIMIZERS", "PagedAdamW", "adamw_update", "make_optimizer"],
    "qlora_ref.interop.bitsandbytes": [
        "from_bitsandbytes", "from_bitsandbytes_linear4bit", "from_linear4bit_state_dict",
        "is_bitsandbytes_linear4bit", "to_bitsandbytes", "to_linear4bit_state_dict",
        "unpack_cpu_tiles"],
    "qlora_ref.codebooks": ["NF4_OFFSET", "code_for", "dynamic_code", "fp4_code", "int4_code",
                            "linspace_float32", "nf4_code", "normal_float_code"],
    "qlora_ref.quant_state": ["QuantState"],
    "qlora_ref.fourbit": ["dequantize_4bit", "dequantize_absmax", "quantize_4bit",
                          "run_dequantize_kernel"],
    "qlora_ref.blockwise": ["ABSMAX_FLOOR", "block_absmax", "decision_boundaries",
                            "dequantize_blockwise", "nearest_code", "quantize_blockwise"],
    "qlora_ref.packing": ["pack_nibbles", "unpack_nibbles"],
    "qlora_ref.double_quant": ["NESTED_BLOCKSIZE", "double_dequantize", "double_quantize"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_every_public_name_still_imports_from_where_it_was(module):
    mod = importlib.import_module(module)
    missing = [name for name in PUBLIC[module] if not hasattr(mod, name)]
    assert not missing, f"{module} lost {missing}"
    unlisted = sorted(set(PUBLIC[module]) - set(getattr(mod, "__all__", ())))
    assert not unlisted, f"{module}.__all__ no longer lists {unlisted}"


def test_star_import_gives_every_public_name():
    namespace = {}
    exec("from qlora_ref import *", namespace)  # noqa: S102 - the package's own __all__
    assert set(PUBLIC["qlora_ref"]) <= set(namespace)
