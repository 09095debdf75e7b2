"""Solutions to the exercises of notebook 06, "Fine-tuning a tiny model" (checked by its check cells)."""
import copy

import qlora_ref
from qlora_ref import memory
from qlora_ref.train import tasks


def _linear_shapes(config):
    """(d_in, d_out) of every linear layer in the transformer blocks (the head is not adapted)."""
    d, hidden = config.n_embd, 4 * config.n_embd       # gpt.MLP: up_proj d -> 4d, down_proj 4d -> d
    per_block = [(d, d)] * 4 + [(d, hidden), (hidden, d)]   # q, k, v, o, up, down
    return per_block * config.n_layer


def lora_count(config, r):
    """Exercise 1. A (r x in) and B (out x r) per adapted layer: r (in + out)."""
    return sum(r * (d_in + d_out) for d_in, d_out in _linear_shapes(config))


def nf4_base_bytes(config):
    """Exercise 2. Every adapted linear weight is quantized on its own (NF4, blocksize 64, double
    quantization): packed codes, 8-bit absmax per block, float32 per 256 absmax, one offset."""
    return sum(memory.quantized_nbytes(d_in * d_out) for d_in, d_out in _linear_shapes(config))


def loss_before_qlora(base_model):
    """Exercise 3. With B = 0 the adapters add nothing, so QLoRA starts as the base model with its
    linear weights rounded to NF4: a different function from the 16-bit base."""
    model = qlora_ref.prepare_model(copy.deepcopy(base_model), r=8)
    return tasks.evaluate(model, "sort", n=50)["loss"]
