"""Dequantize a 4096 x 4096 NF4 weight on one thread: each vector path of the kernels, bitsandbytes, a copy.

    python docs/scripts/dequantize_paths.py

Rows (best of 15 rounds; the rows take turns within a round, so a change of
load hits them alike):

* ``qlora_ref <path> f32 / bf16, preallocated``: the kernel alone
  (``dequantize_4bit_packed[_bf16]``) writing into an existing buffer, for
  each vector path this CPU has (``quant4.simd_levels()``);
* ``qlora_ref dequantize_4bit, fresh output``: the public NumPy API
  (validation, a new output array);
* ``bitsandbytes kernel, preallocated``: its C kernel
  (``cdequantize_blockwise_cpu_nf4_fp32`` / ``_bf16``, the call its CPU
  backend makes for these shapes) writing into an existing tensor;
* ``bitsandbytes dequantize_4bit, fresh output``: its public API on CPU
  (it takes no ``out=`` on CPU), a new torch tensor each call;
* ``copy``: ``np.copyto`` of a 64 MiB float32 buffer (read 64 MiB, write 64 MiB).

Minor page faults per call are counted for the fresh-output rows: a new
64 MiB output is either heap memory glibc kept (no faults) or fresh pages
faulted in on first touch, which can cost more than the kernel.
"""
from __future__ import annotations

import logging
import os
import resource
import time

os.environ.setdefault("QLORA_REF_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # bitsandbytes' C kernels: one thread too

import numpy as np  # noqa: E402
import torch  # noqa: E402

import qlora_ref  # noqa: E402
from qlora_ref.backend import kernels  # noqa: E402

ROUNDS = 15


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    logging.disable(logging.WARNING)  # bitsandbytes' note about an optional CPU gemm package
    import bitsandbytes.functional as bnb

    torch.set_num_threads(1)
    k = kernels()
    n = 4096 * 4096
    w = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)
    state = qlora_ref.quantize_4bit(w, "nf4", 64, double_quant=False)
    packed, qs = qlora_ref.to_bitsandbytes(state)
    qs16 = qlora_ref.to_bitsandbytes(state)[1]
    qs16.dtype = torch.bfloat16
    out32, out16 = np.empty(n, np.float32), np.empty(n, np.uint16)
    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)

    def kernel(level, bf16):
        fn = k.dequantize_4bit_packed_bf16 if bf16 else k.dequantize_4bit_packed
        out = out16 if bf16 else out32

        def call():
            k.set_simd_level(level)
            fn(state.packed, state.absmax, state.code, 64, out, 1)
        return call

    rows = {f"qlora_ref {level} {'bf16' if bf16 else 'f32'}, preallocated": kernel(level, bf16)
            for level in k.simd_levels() for bf16 in (False, True)}
    best_level = k.simd_levels()[-1]
    rows["qlora_ref dequantize_4bit f32, fresh output"] = (
        lambda: (k.set_simd_level(best_level), qlora_ref.dequantize_4bit(state)))
    rows["qlora_ref dequantize_4bit bf16, fresh output"] = (
        lambda: (k.set_simd_level(best_level), qlora_ref.dequantize_4bit(state, dtype="bfloat16")))
    import ctypes as ct

    from bitsandbytes.cextension import lib

    a = packed.reshape(4096, 2048)
    t32, t16 = torch.empty(4096, 4096), torch.empty(4096, 4096, dtype=torch.bfloat16)
    absmax = torch.from_numpy(state.absmax)

    def bnb_kernel(fn, out):
        return lambda: fn(ct.c_void_p(a.data_ptr()), ct.c_void_p(absmax.data_ptr()),
                          ct.c_void_p(out.data_ptr()), ct.c_longlong(64), ct.c_longlong(4096),
                          ct.c_longlong(4096))

    rows["bitsandbytes kernel f32, preallocated"] = bnb_kernel(
        lib.cdequantize_blockwise_cpu_nf4_fp32, t32)
    rows["bitsandbytes kernel bf16, preallocated"] = bnb_kernel(
        lib.cdequantize_blockwise_cpu_nf4_bf16, t16)
    rows["bitsandbytes dequantize_4bit f32, fresh output"] = lambda: bnb.dequantize_4bit(packed, qs)
    rows["bitsandbytes dequantize_4bit bf16, fresh output"] = lambda: bnb.dequantize_4bit(packed, qs16)
    rows["copy of 64 MiB float32"] = lambda: np.copyto(dst, src)

    best = {name: float("inf") for name in rows}
    faults = {name: 0.0 for name in rows}
    for name, fn in rows.items():
        fn()  # warm-up
    for _ in range(ROUNDS):
        for name, fn in rows.items():
            f0, t0 = _faults(), time.perf_counter()
            fn()
            t, f = time.perf_counter() - t0, _faults() - f0
            if t < best[name]:
                best[name], faults[name] = t, f
    k.set_simd_level("auto")
    assert torch.equal(t32, torch.from_numpy(qlora_ref.dequantize_4bit(state))), "f32 differs"
    copy = best["copy of 64 MiB float32"]
    print(f"4096 x 4096 NF4, blocksize 64, 1 thread, best of {ROUNDS}; load average "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| row | ms | Melem/s | x copy time | page faults |")
    print("|---|---:|---:|---:|---:|")
    for name, t in best.items():
        print(f"| {name} | {t * 1e3:.2f} | {n / t / 1e6:,.0f} | {copy / t:.2f} | {faults[name]:.0f} |")


if __name__ == "__main__":
    main()
