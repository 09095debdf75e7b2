"""What a part is told: the sizes of the GPU run and of the CPU dry run, the output folder, the device."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: The repository's root folder (``scripts/gpu_check/`` is two levels below it).
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Sizes:
    """Everything whose size differs between the GPU run and the CPU dry run."""

    layer: int                  #: the benchmark layer is (layer, layer)
    tokens: tuple               #: (batch, seq) of the benchmark input
    r: int                      #: LoRA rank in (b) and (d) (the paper's 64 on the GPU)
    lora_alpha: float           #: LoRA alpha in (b) and (d) (the paper's 16)
    warmup: int                 #: untimed forward+backward calls per layer in (b)
    rounds: int                 #: (b): the three layers take turns, this many rounds ...
    iters: int                  #: ... of this many calls each; the best round counts
    finetune_flags: tuple       #: extra ``qlora-ref finetune`` flags in (c)
    llama: dict = field(default_factory=dict)  #: transformers.LlamaConfig fields in (d)
    llama_tokens: tuple = ()    #: (batch, seq) of one training step in (d)
    llama_steps: int = 3        #: training steps per model in (d); the first is a warm-up
    #: (e): None is the real model (SmolLM2-135M, the ``real`` extra); a dict is a tiny
    #: transformers.LlamaConfig written to a folder in its place (the dry run)
    real_model: dict | None = None
    real_tokens: tuple = (8, 256)   #: (batch, seq) of one training step in (e)
    real_warmup: int = 3        #: (e): untimed training steps per model ...
    real_rounds: int = 5        #: ... then the two models take turns, this many rounds ...
    real_iters: int = 5         #: ... of this many steps each; the best round counts
    new_tokens: int = 64        #: (e): greedy tokens generated after the chat prompt ...
    decode_rounds: int = 3      #: ... this many times per model, taking turns, after a warm-up


# Llama shapes: TinyLlama-1.1B's hidden and MLP sizes, with as many key/value heads as
# query heads (q, k, v, o all hidden x hidden, which is what qlora_ref.memory.PROJECTIONS
# counts), and 18 layers: 0.93B in the decoder + 0.13B embeddings and head = 1.06B.
FULL = Sizes(layer=4096, tokens=(8, 512), r=64, lora_alpha=16, warmup=3, rounds=5, iters=10,
             finetune_flags=(),   # the main job as `qlora-ref finetune` runs it
             llama=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18,
                        num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                        max_position_embeddings=2048),
             llama_tokens=(2, 512), llama_steps=3,
             real_model=None, real_tokens=(8, 256), real_warmup=3, real_rounds=5, real_iters=5,
             new_tokens=64, decode_rounds=3)
DRY = Sizes(layer=256, tokens=(2, 16), r=8, lora_alpha=16, warmup=1, rounds=2, iters=2,
            finetune_flags=("--max-steps", "2", "--batch-size", "8"),
            llama=dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                       max_position_embeddings=64),
            llama_tokens=(1, 16), llama_steps=2,
            # every width a multiple of 32: bitsandbytes' CPU inference path (on CPUs with
            # AVX512-BF16) repacks the 4-bit weight in blocks of 32 output rows
            real_model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                            max_position_embeddings=128, tie_word_embeddings=True),
            real_tokens=(2, 16), real_warmup=1, real_rounds=2, real_iters=1,
            new_tokens=4, decode_rounds=1)


@dataclass
class Context:
    """What a part is told: where to write, on which device, at which sizes."""

    out: Path
    device: str
    dry_run: bool

    @property
    def sizes(self) -> Sizes:
        return DRY if self.dry_run else FULL


class PartSkipped(Exception):
    """A part that cannot run here for a stated reason (not a failure): status ``skipped``."""
