"""Solutions to the exercises of notebook 07, "The memory budget of a 65B model" (checked by its check cells)."""
import math


def qlora_gb(n_params, n_lora):
    """Exercise 1. NF4 codes (4 bits) + one 8-bit absmax per 64 weights + one float32 per 256
    absmax + one float32 offset; adapters and their gradients in 16 bits; Adam's two float32
    moments for the adapters only."""
    blocks = math.ceil(n_params / 64)
    weights = math.ceil(n_params / 2) + blocks + 4 * math.ceil(blocks / 256) + 4
    return (weights + 2 * n_lora + 2 * n_lora + 8 * n_lora) / 1e9


def largest_rank(budget_gb, activation_bytes):
    """Exercise 2. Everything but the adapters is fixed; each rank adds 12 bytes (16-bit weight and
    gradient, two float32 moments) per LoRA parameter, and LLaMA-65B has 80 r (4 * 2h + 3 (h + i))
    of those (q, k, v, o: h -> h; gate, up: h -> i; down: i -> h). Solve for r and round down."""
    h, i, layers = 8192, 22016, 80
    per_rank = layers * (4 * 2 * h + 3 * (h + i))              # LoRA parameters per unit of rank
    fixed = qlora_gb(65e9, 0) * 1e9 + activation_bytes        # bytes with no adapters
    return max(0, math.floor((budget_gb * 1e9 - fixed) / (12 * per_rank)))


def longest_sequence(n_params, n_lora, shape, budget_gb, gradient_checkpointing):
    """Exercise 3. What is left of the budget after the static memory (exercise 1), divided by the
    activation bytes of one token (bfloat16, 2 bytes a value; ``memory.activation_memory``):
    each decoder layer saves 8h + 3i values per token, the head h + V. Without checkpointing all
    L layers keep theirs; with it only each layer's input (h values) is kept, and one layer's full
    set is alive while it is recomputed."""
    h, i, layers, vocab = shape.hidden_size, shape.intermediate_size, shape.n_layers, shape.vocab_size
    e_layer = 8 * h + 3 * i                                     # values one layer saves per token
    if gradient_checkpointing:
        per_token = 2 * (layers * h + e_layer + h + vocab)
    else:
        per_token = 2 * (layers * e_layer + h + vocab)
    left = budget_gb * 1e9 - qlora_gb(n_params, n_lora) * 1e9  # bytes for activations
    return max(0, math.floor(left / per_token))
