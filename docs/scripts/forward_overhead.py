"""Per-call cost of one 256x256 QLoRA layer: dequantize, forward, forward+backward (1 thread).

Run: ``python docs/scripts/forward_overhead.py`` (see docs/benchmarks.md, "The forward path").
At this size the fixed cost of a call, not the arithmetic, is most of the time.
"""
import time

import qlora_ref  # before torch: it sets how OpenMP threads wait
import torch

torch.set_num_threads(1)
torch.manual_seed(0)
layer = qlora_ref.prepare_model(torch.nn.Sequential(torch.nn.Linear(256, 256)), r=8,
                                lora_alpha=16)[0]
x = torch.randn(1, 256)
x_grad = torch.randn(1, 256, requires_grad=True)


def best_us(f, reps=2000, rounds=7):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            f()
        times.append((time.perf_counter() - start) / reps * 1e6)
    return min(times)


with torch.no_grad():
    print(f"dequantize 256x256 float32: "
          f"{best_us(lambda: layer.base_layer.dequantize(torch.float32)):.1f} us")
    print(f"LoRALinear forward, 1 token, no grad: {best_us(lambda: layer(x)):.1f} us")
print(f"LoRALinear forward+backward, 1 token: "
      f"{best_us(lambda: layer(x_grad).sum().backward(), reps=500):.1f} us")
