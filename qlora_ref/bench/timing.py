r"""How the benchmark times a call, and the process settings it touches (and restores).

* :func:`measure` -- best seconds per call of several callables that take
  turns ("Best of N", "Interleaved", "CPU time" in :mod:`qlora_ref.bench`);
  the storage rows, the layer step, the generate table and
  ``docs/scripts/forward_overhead.py`` all time through it;
* page faults (:func:`minor_faults`) and glibc's heap reuse
  (:func:`reuse_heap_memory`, process wide and not undoable);
* the settings a run changes -- torch's and libgomp's threads, the
  environment, ``torch._dynamo.config.disable`` -- read by
  :func:`process_settings_now` and restored by :func:`process_settings`;
* :func:`machine_info`, the CPU and the versions a table was measured with;
* the system libgomp's ``omp_set_num_threads`` / ``omp_get_max_threads``
  (bitsandbytes' CPU library links it).

Imports torch only inside functions, and only when torch is already loaded
or a function needs it.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import math
import os
import platform
import sys
import time
import warnings

try:
    import resource  # Unix: page-fault counts
except ImportError:  # pragma: no cover - Windows
    resource = None

__all__ = ["measure", "best_seconds", "minor_faults", "reuse_heap_memory", "dynamo_disabled",
           "omp_set_num_threads", "omp_get_max_threads", "process_settings",
           "process_settings_now", "machine_info", "SLOW_CALL_S"]

_MIN_SAMPLE_S = 0.002      # shorter calls are batched inside one sample
#: Calls slower than this get 3 samples.
SLOW_CALL_S = 1.0


def _calibrate(fn) -> tuple[int, float, object]:
    """Run ``fn`` once (a warm-up) and choose how many calls make one sample."""
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    return max(1, math.ceil(_MIN_SAMPLE_S / max(elapsed, 1e-7))), elapsed, result


def measure(rows: dict, repeat: int, warmup: int, set_threads=None) -> dict:
    """Best seconds per call for each ``name -> (threads, fn)``.

    Rows run in phases, one per thread count (single-threaded rows first),
    and take turns within a phase. ``set_threads(t)`` is called when a phase
    starts (torch's and bitsandbytes' OpenMP pools). Returns, per row: the
    best wall-clock seconds, the best CPU seconds of the calling thread
    (single-threaded rows only; see "CPU time"), the samples taken, and the
    result of the first call.
    """
    out = {}
    for t in sorted({threads for threads, _ in rows.values()}):
        phase = {name: fn for name, (threads, fn) in rows.items() if threads == t}
        if set_threads is not None:
            set_threads(t)
        batch = {}
        for name, fn in phase.items():
            batch[name], first, result = _calibrate(fn)
            for _ in range(warmup - 1):
                fn()
            out[name] = {"seconds": math.inf, "cpu_seconds": math.inf if t == 1 else None,
                         "page_faults": None, "samples": 0, "first": first, "result": result}
        for i in range(repeat):
            for name, fn in phase.items():
                r = out[name]
                if i >= 3 and r["first"] > SLOW_CALL_S:
                    continue
                k = batch[name]
                faults = minor_faults()
                cpu, start = time.thread_time(), time.perf_counter()
                for _ in range(k):
                    fn()
                wall, cpu = time.perf_counter() - start, time.thread_time() - cpu
                faults = (minor_faults() - faults) / k
                if wall / k < r["seconds"]:
                    r["seconds"], r["page_faults"] = wall / k, faults
                if r["cpu_seconds"] is not None:
                    r["cpu_seconds"] = min(r["cpu_seconds"], cpu / k)
                r["samples"] += 1
    return out


def best_seconds(fn, repeat: int, warmup: int = 1) -> float:
    """Best seconds per call of ``fn`` alone: :func:`measure` of one single-threaded row."""
    return measure({"fn": (1, fn)}, repeat, warmup)["fn"]["seconds"]


def reuse_heap_memory() -> bool:
    """Make glibc serve large blocks from the heap and keep freed ones (see "page faults not")."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3          # glibc's <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and
                    libc.mallopt(m_trim_threshold, 1 << 31))
    except (OSError, AttributeError):                        # not glibc
        return False


def minor_faults() -> int:
    """Minor page faults of this process so far (first touches of fresh memory); 0 if unknown."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


@contextlib.contextmanager
def dynamo_disabled():
    try:
        import torch._dynamo
    except Exception:  # pragma: no cover - torch without dynamo
        yield
        return
    before = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    try:
        yield
    finally:
        torch._dynamo.config.disable = before


def omp_set_num_threads():
    """``omp_set_num_threads`` of the system libgomp (bitsandbytes' CPU library links it)."""
    name = ctypes.util.find_library("gomp") or "libgomp.so.1"
    try:
        return ctypes.CDLL(name).omp_set_num_threads
    except (OSError, AttributeError):
        return lambda n: None


def omp_get_max_threads():
    name = ctypes.util.find_library("gomp") or "libgomp.so.1"
    try:
        return ctypes.CDLL(name).omp_get_max_threads
    except (OSError, AttributeError):
        return lambda: None


def process_settings_now() -> dict:
    """What this benchmark may change in a process: environment, torch and libgomp threads, dynamo."""
    out = {}
    if "torch" in sys.modules:
        import torch

        out["torch_threads"] = torch.get_num_threads()
        try:
            import torch._dynamo  # first: importing it sets TORCHINDUCTOR_CACHE_DIR
            out["dynamo_disable"] = torch._dynamo.config.disable
        except Exception:  # noqa: BLE001  # pragma: no cover - torch without dynamo
            out["dynamo_disable"] = None
    out.update(environ=dict(os.environ), omp_max_threads=omp_get_max_threads()())
    return out


@contextlib.contextmanager
def process_settings():
    """Restore, on exit, every process setting an in-process run changes.

    Environment variables (``TORCHDYNAMO_DISABLE``, ``QLORA_REF_NUM_THREADS``),
    torch's intra-op thread count, libgomp's thread count (bitsandbytes' C
    kernels) and ``torch._dynamo.config.disable``. The allocator is not in
    the list: an in-process run never touches it.
    """
    before = process_settings_now()
    try:
        yield before
    finally:
        for key in set(os.environ) - set(before["environ"]):
            del os.environ[key]
        os.environ.update(before["environ"])
        if "torch" in sys.modules:
            import torch

            torch.set_num_threads(before.get("torch_threads", torch.get_num_threads()))
            if before.get("dynamo_disable") is not None:
                torch._dynamo.config.disable = before["dynamo_disable"]
        if before["omp_max_threads"] is not None:
            omp_set_num_threads()(before["omp_max_threads"])


def machine_info() -> dict:
    """CPU model and core count, and the versions of everything in the table."""
    def version(module):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                logging.disable(logging.WARNING)
                try:
                    return __import__(module).__version__
                finally:
                    logging.disable(logging.NOTSET)
        except Exception:  # noqa: BLE001
            return "not installed"

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from ..backend import cython_available, kernels

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": version("numpy"), "torch": version("torch"),
            "bitsandbytes": version("bitsandbytes"), "torchao": version("torchao"),
            "cython": version("Cython"),
            "openmp": bool(cython_available() and kernels().openmp_enabled())}
