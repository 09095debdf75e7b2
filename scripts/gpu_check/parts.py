"""The six parts, in the order they run, each with its folder, title and time limit."""
from __future__ import annotations

from dataclasses import dataclass

from . import a_cuda_tests, b_layer_bench, c_finetune, d_llama_memory, e_real_model, f_fsdp


@dataclass(frozen=True)
class Part:
    key: str
    folder: str
    title: str
    timeout_s: int      #: the part's subprocess is killed (with its children) after this
    run: object         #: Context -> result dict (run in the part's own process)
    markdown: object    #: result dict -> the part's result.md


# The limits add up to 660 s; the driver also stops at TOTAL_LIMIT_S (a part is given at most
# what is left of it), so the whole script ends inside 8 minutes on one H100-class GPU even
# if parts run to their limits; expected there: about 4 to 5 minutes (not yet measured).
TOTAL_LIMIT_S = 470
PARTS = (
    Part("a", "a_cuda_tests", "CUDA-marked tests (bitsandbytes CUDA parity, torch layer, "
         "PagedAdamW on pinned memory)", 120, a_cuda_tests.run, a_cuda_tests.markdown),
    Part("b", "b_layer_bench", "layer benchmark: qlora_ref vs bitsandbytes + PEFT vs 16-bit + "
         "PEFT", 60, b_layer_bench.run, b_layer_bench.markdown),
    Part("c", "c_finetune", "qlora-ref finetune on the device", 120, c_finetune.run,
         c_finetune.markdown),
    Part("d", "d_llama_memory", "~1B Llama: 16-bit LoRA vs QLoRA memory vs qlora-ref memory",
         150, d_llama_memory.run, d_llama_memory.markdown),
    Part("e", "e_real_model", "SmolLM2-135M: QLoRA steps/s and peak memory vs bitsandbytes + "
         "PEFT; greedy decoding tokens/s, 4-bit and bfloat16", 150, e_real_model.run,
         e_real_model.markdown),
    Part("f", "f_fsdp", "FSDP2 at world size 1 (NCCL; gloo in the dry run): hooks run, loss "
         "equals unsharded", 60, f_fsdp.run, f_fsdp.markdown),
)
PART_BY_KEY = {p.key: p for p in PARTS}
