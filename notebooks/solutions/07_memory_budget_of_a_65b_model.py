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


def paged_adamw_numbers(shapes, page_size):
    """Exercise 3. Host: both moments of every parameter (2 x 4 bytes per element). Device: one
    page of both moments of the largest parameter (a page is at most the whole tensor).
    Pages: each parameter is walked in pages of page_size elements, both moments together."""
    sizes = [math.prod(shape) for shape in shapes]
    host = sum(2 * 4 * n for n in sizes)
    device = 2 * 4 * max(min(page_size, n) for n in sizes)
    pages = sum(math.ceil(n / page_size) for n in sizes)
    return host, device, pages
