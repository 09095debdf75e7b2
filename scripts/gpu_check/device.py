"""Memory and time on the device: torch's CUDA allocator counters, and calls timed in turns.

On the CPU (the dry run) the memory readings are ``None`` (nothing comparable
to read) and the timings are the CPU's. Timing goes through the benchmark's
:func:`qlora_ref.bench.timing.measure`: the callables take turns, round by
round, so a change in load hits them alike, and the best round counts.
"""
from __future__ import annotations

import gc


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA calls return before their kernels end)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def allocated(device: str):
    """Bytes held by torch's CUDA allocator now (None on CPU: nothing comparable to read)."""
    import torch

    return torch.cuda.memory_allocated() if device == "cuda" else None


def reset_peak(device: str) -> None:
    """Free what Python no longer holds, and start a new peak-memory count."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(device: str):
    """The allocator's peak bytes since :func:`reset_peak` (None on CPU)."""
    import torch

    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def minus(a, b):
    return None if a is None or b is None else a - b


def ratio(a, b):
    return None if a is None or not b else a / b


def seconds_in_turns(fns: dict, device: str, rounds: int, calls: int = 1) -> dict:
    """Best seconds per call of each ``name -> fn``, the callables taking turns for ``rounds`` rounds.

    One sample is ``calls`` calls of ``fn`` and a device sync (so the time
    includes the kernels, not only their launch); one untimed sample comes
    first (a warm-up). Returns ``{name: {"seconds": s, "samples": n, "result": r}}``
    where ``r`` is what the warm-up's last call returned.
    """
    from qlora_ref.bench.timing import measure

    def sample(fn):
        def run():
            for _ in range(calls):
                result = fn()
            sync(device)
            return result
        return run

    sync(device)
    timed = measure({name: (1, sample(fn)) for name, fn in fns.items()}, repeat=rounds, warmup=1)
    return {name: {"seconds": r["seconds"] / calls, "samples": r["samples"], "result": r["result"]}
            for name, r in timed.items()}
