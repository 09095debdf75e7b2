r"""Speed of the 4-bit storage paths, against bitsandbytes, torchao and a memory copy.

``python -m qlora_ref.cli.bench`` (the CLI's ``qlora-ref bench`` calls the same
:func:`main`) prints one table per matrix size, every number from the same
run. Operations (NF4, blocksize 64, double quantization as in the paper):

* ``quantize``     -- :func:`qlora_ref.quantize_4bit` (float32 in, packed codes
  and double-quantized constants out);
* ``dequant f32`` / ``dequant bf16`` -- :func:`qlora_ref.dequantize_4bit` to
  float32, and to a bfloat16 ``torch.Tensor``;
* ``pack`` / ``unpack`` -- two 4-bit codes per byte and back
  (:mod:`qlora_ref.packing` and its Cython twins).

Implementations: the NumPy reference; the Cython kernels on 1 thread and on
``--threads`` threads; bitsandbytes' CPU path
(``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` on CPU
tensors, ``compress_statistics=True``); torchao's ``NF4Tensor`` (``to_nf4``,
``get_original_weight``) when torchao is installed; and ``np.copyto`` of as
many bytes as the operation writes -- the rate at which this machine moves
that output, the bandwidth limit.

Method (named notes):

* *Best of N.* Each cell is the fastest of ``--repeat`` wall-clock runs
  (``time.perf_counter``) after ``--warmup`` untimed runs; calls that take
  over a second get 3 runs. Calls shorter than 2 ms are repeated inside one
  sample (the sample is their mean), so timer and Python overheads stay small.
* *Interleaved.* Within an operation the implementations take turns (round
  robin), so a change in machine load hits all rows alike.
* *Threads.* bitsandbytes runs torch ops and its own OpenMP C kernels:
  ``torch.set_num_threads`` and ``omp_set_num_threads`` (of the system
  libgomp its library links) are set to the row's thread count. torchao is
  plain torch. Ratios ("x bnb") compare rows with the same thread count.
* *Dynamo off.* bitsandbytes wraps some CPU fallbacks in ``torch.compile``;
  compiling would dominate the first calls (and the fallbacks are not taken
  for these shapes). The measuring child process starts with
  ``TORCHDYNAMO_DISABLE=1`` (unless set), and the run sets
  ``torch._dynamo.config.disable`` (restored afterwards).
* *Allocation included, page faults not.* Every row returns a fresh output
  (as the APIs do); the copy row copies into a preallocated buffer. Whether
  a fresh 64 MiB output costs page faults depends on glibc's history: a
  large free chunk inside the heap is reused without faults, otherwise the
  request is a new ``mmap`` faulted in page by page (4 KiB pages for torch,
  2 MiB huge pages for NumPy; 16384 faults cost bitsandbytes about 40 ms
  here). To measure the operations rather than that history, the benchmark
  sets glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` high (``mallopt``)
  so that outputs reuse heap memory; ``--fresh-pages`` leaves the allocator
  alone. The tables print the page faults per call of the dequantization rows.
* *The caller's process is left as it was.* ``mallopt`` is process wide and
  cannot be undone (glibc's adaptive thresholds do not come back), so a
  heap-reuse run measures in a fresh child process
  (``python -m qlora_ref.cli.bench --report-json FILE ...``) whose tables are
  relayed and whose numbers come back as JSON. An in-process run
  (``fresh_pages=True``) sets thread counts, environment variables and
  ``torch._dynamo.config.disable`` for its rows and restores all of them
  afterwards (:func:`process_settings`, tested before == after).
* *Copy.* ``np.copyto`` between page-aligned buffers: two consecutive heap
  allocations sit 16 bytes past a multiple of 4096 apart, where glibc's
  ``rep movsb`` copy runs 10-20x slower on some CPUs (this one included).
* *CPU time.* On a shared machine a long call is more often interrupted
  than a short one, which flatters the fast rows. The second table of each
  size times the single-threaded rows by ``time.thread_time`` (CPU time of
  the calling thread, system time of its page faults included).
* *A benchmark, not a test*: nothing here asserts a speed. The Cython outputs
  are checked byte-identical to the NumPy ones on the benchmark data.

:func:`qlora_layer_step_time` times a LoRA layer over a 4-bit base
(``qlora_ref.nn``), forward and backward, against the same layer over a
16-bit base.

``--contention`` prints :func:`contention_table` instead: what a user of a
*shared* machine meets. The benchmark starts busy processes of its own (2
by default; each ends by itself after a deadline and is killed in a
``finally``), then runs, in a fresh process per row, a 30-step
``finetune`` of the tiny GPT and the Cython dequantization on 1 and 2
threads, for each way a process may be set up: the package's default
OpenMP policy (:mod:`qlora_ref._runtime`), torch imported before
``qlora_ref``, libgomp's own spinning default, ``OMP_NUM_THREADS=1``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import ctypes.util
import logging
import math
import os
import platform
import sys
import time
import warnings

import numpy as np

try:
    import resource  # Unix: page-fault counts
except ImportError:  # pragma: no cover - Windows
    resource = None

from .. import packing
from ..backend import cython_available, default_num_threads, kernels
from ..validation import MAX_THREADS, check_int_range, check_matrix_side, check_num_threads
from ..fourbit import dequantize_4bit, quantize_4bit

__all__ = ["run_benchmarks", "qlora_layer_step_time", "contention_table", "add_arguments", "main",
           "process_settings", "process_settings_now", "OPERATIONS", "CONTENTION_SETUPS"]

#: Columns of the table, in order.
OPERATIONS = ("quantize", "dequant f32", "dequant bf16", "pack", "unpack")

_MIN_SAMPLE_S = 0.002      # shorter calls are batched inside one sample
_SLOW_CALL_S = 1.0         # calls slower than this get 3 samples


# -- timing ------------------------------------------------------------------------

def _calibrate(fn) -> tuple[int, float, object]:
    """Run ``fn`` once (a warm-up) and choose how many calls make one sample."""
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    return max(1, math.ceil(_MIN_SAMPLE_S / max(elapsed, 1e-7))), elapsed, result


def _measure(rows: dict, repeat: int, warmup: int, set_threads=None) -> dict:
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
                if i >= 3 and r["first"] > _SLOW_CALL_S:
                    continue
                k = batch[name]
                faults = _minor_faults()
                cpu, start = time.thread_time(), time.perf_counter()
                for _ in range(k):
                    fn()
                wall, cpu = time.perf_counter() - start, time.thread_time() - cpu
                faults = (_minor_faults() - faults) / k
                if wall / k < r["seconds"]:
                    r["seconds"], r["page_faults"] = wall / k, faults
                if r["cpu_seconds"] is not None:
                    r["cpu_seconds"] = min(r["cpu_seconds"], cpu / k)
                r["samples"] += 1
    return out


def _reuse_heap_memory() -> bool:
    """Make glibc serve large blocks from the heap and keep freed ones (see "page faults not")."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3          # glibc's <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and
                    libc.mallopt(m_trim_threshold, 1 << 31))
    except (OSError, AttributeError):                        # not glibc
        return False


def _minor_faults() -> int:
    """Minor page faults of this process so far (first touches of fresh memory); 0 if unknown."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


@contextlib.contextmanager
def _dynamo_disabled():
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


def _omp_set_num_threads():
    """``omp_set_num_threads`` of the system libgomp (bitsandbytes' CPU library links it)."""
    name = ctypes.util.find_library("gomp") or "libgomp.so.1"
    try:
        return ctypes.CDLL(name).omp_set_num_threads
    except (OSError, AttributeError):
        return lambda n: None


# -- the implementations -----------------------------------------------------------

def _load_bitsandbytes():
    try:
        import bitsandbytes.functional as F
        return F, None
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return None, f"not installed ({type(exc).__name__})"


def _load_torchao():
    """torchao's ``to_nf4``, importing quietly (it logs about CUDA libraries it cannot load)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
        except ImportError:
            try:
                from torchao.dtypes.nf4tensor import to_nf4  # torchao < 0.15
            except ImportError as exc:
                return None, f"not installed ({exc.name or 'torchao'})"
        except Exception as exc:  # noqa: BLE001
            return None, f"not usable ({type(exc).__name__}: {exc})"
        finally:
            logging.disable(logging.NOTSET)
    return to_nf4, None


def _rows_for(op: str, x, state, codes, threads: int, libs: dict, cache: dict) -> dict:
    """``label -> (threads, fn)`` for one operation; a missing library gives no row.

    ``cache`` keeps the other libraries' quantized forms of ``x`` between operations.
    """
    import torch

    n = x.size
    k = kernels() if cython_available() else None
    counts = [1] if threads == 1 else [1, threads]
    rows = {}

    if op == "quantize":
        rows["numpy reference"] = (1, lambda: quantize_4bit(x, backend="numpy"))
        for t in counts if k else []:
            rows[f"cython, {t} thr"] = (t, lambda t=t: quantize_4bit(x, backend="cython",
                                                                       num_threads=t))
    elif op in ("dequant f32", "dequant bf16"):
        dtype = "float32" if op == "dequant f32" else "bfloat16"
        rows["numpy reference"] = (1, lambda: dequantize_4bit(state, dtype, backend="numpy"))
        for t in counts if k else []:
            rows[f"cython, {t} thr"] = (t, lambda t=t: dequantize_4bit(
                state, dtype, backend="cython", num_threads=t))
    elif op == "pack":
        rows["numpy reference"] = (1, lambda: packing.pack_nibbles(codes, pad=7))

        def pack(t):
            out = np.empty((n + 1) // 2, np.uint8)
            k.pack_nibbles(codes, 7, out, t)
            return out
        for t in counts if k else []:
            rows[f"cython, {t} thr"] = (t, lambda t=t: pack(t))
    elif op == "unpack":
        rows["numpy reference"] = (1, lambda: packing.unpack_nibbles(state.packed, n))

        def unpack(t):
            out = np.empty(n, np.uint8)
            k.unpack_nibbles(state.packed, out, t)
            return out
        for t in counts if k else []:
            rows[f"cython, {t} thr"] = (t, lambda t=t: unpack(t))

    F = libs["bitsandbytes"]
    xt = torch.from_numpy(x)
    if F is not None and op in ("quantize", "dequant f32", "dequant bf16"):
        if "bitsandbytes" not in cache:
            cache["bitsandbytes"] = F.quantize_4bit(xt, blocksize=64, compress_statistics=True,
                                                    quant_type="nf4")
        q, qs = cache["bitsandbytes"]
        if op == "quantize":
            fn = lambda: F.quantize_4bit(xt, blocksize=64, compress_statistics=True,  # noqa: E731
                                         quant_type="nf4")
        else:
            qs_out = copy.copy(qs)  # the output dtype is a field of bitsandbytes' QuantState
            qs_out.dtype = torch.float32 if op == "dequant f32" else torch.bfloat16
            fn = lambda: F.dequantize_4bit(q, qs_out)  # noqa: E731
        for t in counts:
            rows[f"bitsandbytes, {t} thr"] = (t, fn)

    to_nf4 = libs["torchao"]
    if to_nf4 is not None and op in ("quantize", "dequant f32", "dequant bf16"):
        if "torchao" not in cache:
            try:  # torchao wants whole groups of 256 blocks: n % 16384 == 0
                cache["torchao"] = to_nf4(xt, 64, 256)
            except (AssertionError, RuntimeError, ValueError) as exc:
                cache["torchao"] = None
                libs["notes"].append(f"torchao NF4: no rows for shape {x.shape} "
                                     f"({type(exc).__name__}: {str(exc).splitlines()[0]})")
        nf4 = cache["torchao"]
        if nf4 is not None:
            fn = {"quantize": lambda: to_nf4(xt, 64, 256),
                  "dequant f32": nf4.get_original_weight,
                  "dequant bf16": lambda: nf4.to(torch.bfloat16)}[op]
            for t in counts:
                rows[f"torchao NF4, {t} thr"] = (t, fn)

    # the bandwidth limit: copy as many bytes as the operation writes
    out_bytes = {"quantize": state.nbytes, "dequant f32": 4 * n, "dequant bf16": 2 * n,
                 "pack": (n + 1) // 2, "unpack": n}[op]
    src, dst = _copy_buffers(out_bytes)
    rows["memory copy"] = (1, lambda: np.copyto(dst, src))
    return rows


def _copy_buffers(nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Page-aligned source and destination of ``nbytes`` each (see the note "Copy").

    Two separate heap allocations often sit 16 bytes past a multiple of 4096
    apart, and glibc's ``memcpy`` (``rep movsb``) is then 10-20x slower on
    some CPUs; aligning both to a page gives the copy its full speed.
    """
    page = 4096
    pad = -(-nbytes // page) * page                    # nbytes rounded up to a page
    buf = np.empty(2 * pad + page, np.uint8)
    start = (-buf.ctypes.data) % page
    src, dst = buf[start:start + nbytes], buf[start + pad:start + pad + nbytes]
    src.fill(1)
    dst.fill(0)
    return src, dst


def _thread_setter(libs: dict):
    """Set torch's intra-op threads and the system libgomp's (bitsandbytes' C kernels)."""
    import torch

    omp = libs["omp_set_num_threads"]

    def set_threads(t):
        torch.set_num_threads(t)
        omp(t)
    return set_threads


def _same_bytes(op: str, results: dict) -> bool | None:
    """Are the Cython results byte-identical to the NumPy reference's? (None: nothing to compare)"""
    import torch

    ref = results.get("numpy reference")
    fast = [v for name, v in results.items() if name.startswith("cython")]
    if ref is None or not fast:
        return None
    for v in fast:
        if op == "quantize":
            same = v.equals(ref)
        elif isinstance(v, torch.Tensor):
            same = torch.equal(v.view(torch.int16), ref.view(torch.int16))
        else:
            same = np.array_equal(np.asarray(v).view(np.uint8), np.asarray(ref).view(np.uint8))
        if not same:
            return False
    return True


# -- the table -----------------------------------------------------------------------

def _parse_size(text: str) -> tuple[int, int]:
    parts = str(text).lower().replace("*", "x").split("x")
    if len(parts) == 1:
        parts = parts * 2
    try:
        rows, cols = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--size wants N or RxC with integer sides, got {text!r}") from None
    return check_matrix_side(rows, cols)


def _check_options(threads, repeat, warmup) -> None:
    """One ``ValueError`` for a bad thread count or run count, before any child is started."""
    if threads is not None:
        check_num_threads(threads)
    check_int_range(repeat, "repeat", 1, 10_000)  # 0 timed runs would print a table of nan
    check_int_range(warmup, "warmup", 0, 10_000)


def run_benchmarks(sizes=((4096, 4096), (256, 256)), threads: int | None = None, repeat: int = 7,
                   warmup: int = 1, seed: int = 0, layer: bool = True, fmt: str = "text",
                   fresh_pages: bool = True, file=None) -> dict:
    """Time every operation for every implementation; print the tables; return the numbers.

    Parameters
    ----------
    sizes : sequence of (rows, cols)
        float32 matrices, N(0, 0.02^2).
    threads : int, optional
        Thread count of the "all threads" rows (default: all cores,
        :func:`qlora_ref.backend.default_num_threads`).
    repeat, warmup : int
        Timed runs (the best is kept) and untimed runs before them.
    layer : bool
        Also time :func:`qlora_layer_step_time` (when ``qlora_ref.nn`` imports).
    fmt : {"text", "md"}
        Plain text, or a Markdown table (as in ``docs/benchmarks.md``).
    fresh_pages : bool
        True (the default when called as a function): measure in this
        process with glibc's allocator as it is, so outputs may be new,
        page-faulted memory; thread counts, environment and dynamo settings
        are restored afterwards. False (``qlora-ref bench`` without
        ``--fresh-pages``): measure in a child process set to reuse heap
        memory (``mallopt``, which cannot be undone); its tables are printed
        to ``file`` and its numbers returned.

    Returns
    -------
    dict
        ``{"machine": {...}, "sizes": {"RxC": {operation: {row: {"seconds", "melem_s", ...}}}},
        "layer": {...}, "settings": {..., "heap_reuse": bool, "pid": measuring process}}``.
    """
    _check_options(threads, repeat, warmup)
    file = file or sys.stdout
    if not fresh_pages:
        return _run_in_child(sizes, threads, repeat, warmup, seed, layer, fmt, file)
    with process_settings():
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # read if torch is first imported now
        return _run(sizes, threads, repeat, warmup, seed, layer, fmt, file, heap_reuse=False)


def _omp_get_max_threads():
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
    out.update(environ=dict(os.environ), omp_max_threads=_omp_get_max_threads()())
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
            _omp_set_num_threads()(before["omp_max_threads"])


def _run_in_child(sizes, threads, repeat, warmup, seed, layer, fmt, file) -> dict:
    """Measure in ``python -m qlora_ref.cli.bench`` with heap reuse; relay its output; return its report."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qlora-ref-bench-") as tmp:
        report_path = os.path.join(tmp, "report.json")
        argv = [sys.executable, "-m", "qlora_ref.cli.bench", "--report-json", report_path,
                "--size", *[f"{r}x{c}" for r, c in sizes], "--repeat", str(repeat),
                "--warmup", str(warmup), "--seed", str(seed), "--format", fmt]
        if threads:
            argv += ["--threads", str(threads)]
        if not layer:
            argv.append("--no-layer")
        env = dict(os.environ)
        env.setdefault("TORCHDYNAMO_DISABLE", "1")  # before the child imports torch ("Dynamo off")
        with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True) as child:
            for line in child.stdout:
                print(line, end="", file=file, flush=True)
        if child.returncode != 0:
            raise RuntimeError(f"the benchmark's measuring process failed (status "
                               f"{child.returncode}; its error is above)")
        with open(report_path) as f:
            return json.load(f)


def _run(sizes, threads, repeat, warmup, seed, layer, fmt, file, heap_reuse: bool) -> dict:
    """The measurement itself, in this process (``heap_reuse``: ``mallopt`` was set for it)."""
    import torch

    threads = threads or default_num_threads()
    libs = {"omp_set_num_threads": _omp_set_num_threads(), "notes": []}
    libs["bitsandbytes"], bnb_note = _load_bitsandbytes()
    libs["torchao"], tao_note = _load_torchao()
    machine = machine_info()
    report = {"machine": machine, "sizes": {}, "settings": dict(
        repeat=repeat, warmup=warmup, threads=threads, seed=seed, heap_reuse=heap_reuse,
        pid=os.getpid())}
    say = lambda *a: print(*a, file=file, flush=True)  # noqa: E731

    say(f"qlora_ref bench: {machine['cpu']} ({machine['cores']} cores), python "
        f"{machine['python']}, numpy {machine['numpy']}, torch {machine['torch']}, "
        f"bitsandbytes {machine['bitsandbytes']}, torchao {machine['torchao']}, "
        f"cython {machine['cython']}")
    say(f"Cython kernels: {'built' if cython_available() else 'NOT built'}"
        f"{', OpenMP' if machine['openmp'] else ', no OpenMP'}; threads: 1 and {threads}; "
        f"best of {repeat} (3 for calls over {_SLOW_CALL_S:.0f} s) after {warmup} warm-up; "
        f"TORCHDYNAMO_DISABLE={os.environ.get('TORCHDYNAMO_DISABLE')}; "
        f"outputs {'reuse heap memory (mallopt)' if heap_reuse else 'may be fresh pages'}; "
        f"load average {os.getloadavg()[0]:.2f}")
    if bnb_note:
        say(f"bitsandbytes: {bnb_note}")
    if tao_note:
        say(f"torchao: {tao_note}")

    previous_threads = torch.get_num_threads()
    with _dynamo_disabled():
        try:
            for rows_, cols in sizes:
                key = f"{rows_}x{cols}"
                report["sizes"][key] = _bench_size(rows_, cols, threads, repeat, warmup, seed,
                                                   libs, fmt, say)
        finally:
            torch.set_num_threads(previous_threads)
            libs["omp_set_num_threads"](previous_threads)
    if layer:
        try:
            import qlora_ref.nn  # noqa: F401
        except ImportError as exc:
            say(f"\nLoRA layer step: qlora_ref.nn is not importable ({exc}); skipped")
        else:
            report["layer"] = _print_layer(threads, repeat, warmup, fmt, say)
    say(f"load average at the end {os.getloadavg()[0]:.2f}")
    return report


def _bench_size(rows_, cols, threads, repeat, warmup, seed, libs, fmt, say) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows_, cols), dtype=np.float32) * np.float32(0.02)
    state = quantize_4bit(x)                               # NF4, blocksize 64, double quant
    codes = packing.unpack_nibbles(state.packed, x.size)   # (n,) uint8 codes 0..15
    n = x.size
    results, same, cache = {}, {}, {}
    for op in OPERATIONS:
        rows = _rows_for(op, x, state, codes, threads, libs, cache)
        measured = _measure(rows, repeat, warmup, _thread_setter(libs))
        same[op] = _same_bytes(op, {name: r.pop("result") for name, r in measured.items()})
        for r in measured.values():
            r["melem_s"] = n / r["seconds"] / 1e6
            r["cpu_melem_s"] = None if r["cpu_seconds"] is None else n / r["cpu_seconds"] / 1e6
        results[op] = measured
    title = f"{rows_}x{cols} float32 ({n / 1e6:.3g} M elements, {x.nbytes / 2**20:.3g} MiB)"
    _print_table(title, results, same, fmt, say, clock="wall")
    _print_table(title, results, same, fmt, say, clock="cpu")
    for note in libs["notes"]:
        say(note)
    libs["notes"].clear()
    return {"results": results, "byte_identical": same}


def _say_table(say, head, body, fmt: str) -> None:
    """A table as Markdown (``fmt == "md"``) or as aligned text columns, through ``say``."""
    rows = [[str(c) for c in line] for line in [head, *body]]
    if fmt == "md":  # blank lines around the table: Markdown needs them
        say("\n| " + " | ".join(rows[0]) + " |")
        say("|" + "---|" * len(rows[0]))
        for line in rows[1:]:
            say("| " + " | ".join(line) + " |")
        say("")
        return
    widths = [max(len(line[i]) for line in rows) for i in range(len(rows[0]))]
    for line in rows:
        say("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(line, widths))))


def _print_table(title, results, same, fmt, say, clock="wall"):
    """One table: a row per implementation, a column per operation.

    ``clock="cpu"``: the single-threaded rows again, timed by the CPU time of
    the calling thread (see the module note "CPU time").
    """
    key = "seconds" if clock == "wall" else "cpu_seconds"
    labels = []
    for op in OPERATIONS:
        for name, r in results[op].items():
            if name not in labels and name != "memory copy" and r[key] is not None:
                labels.append(name)
    labels.append("memory copy")

    def cell(op, name):
        r = results[op].get(name)
        if r is None:
            return "n/a"
        rate = results[op][name]["melem_s" if clock == "wall" else "cpu_melem_s"]
        text = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2f}"
        threads = name.rsplit(", ", 1)[-1] if "thr" in name else "1 thr"
        ref = results[op].get(f"bitsandbytes, {threads}")
        if ref is not None and name != "memory copy":
            ratio = ref[key] / r[key]
            text += f" ({ratio:.2g}x)" if ratio < 10 else f" ({ratio:.0f}x)"
        return text

    def share(op, name):
        r, c = results[op].get(name), results[op]["memory copy"]
        return "n/a" if r is None else f"{100 * c[key] / r[key]:.0f}%"

    head = ["", *OPERATIONS]
    body = [[name, *(cell(op, name) for op in OPERATIONS)] for name in labels]
    for name in labels:
        if name.startswith("cython"):
            body.append([f"{name}: % of copy", *(share(op, name) for op in OPERATIONS)])
    numpy_ref = "numpy reference"
    for name in labels:
        if name.startswith("cython") and numpy_ref in labels:
            body.append([f"numpy ref. slower than {name} by", *(
                f"{results[op][numpy_ref][key] / results[op][name][key]:.1f}x"
                for op in OPERATIONS)])
    body.append(["Cython == NumPy bytes", *("yes" if same[op] else "n/a" if same[op] is None
                                             else "NO" for op in OPERATIONS)])
    if clock == "wall":
        say(f"\n{title}\nMelem/s, wall clock (x bitsandbytes' CPU path on as many threads):")
    else:
        say("Same run, single-threaded rows by CPU time of the calling thread "
            "(the time this machine's other jobs took is left out):")
    _say_table(say, head, body, fmt)
    copies = ", ".join(f"{op} {results[op]['memory copy'][key] * 1e3:.3g} ms"
                       for op in OPERATIONS)
    say(f"memory copy = np.copyto of the bytes each operation writes: {copies}")
    if clock == "wall":
        faults = "; ".join(f"{op}: " + ", ".join(
            f"{name.replace(', 1 thr', '')} {r['page_faults']:.0f}"
            for name, r in results[op].items() if name.endswith("1 thr") and r["page_faults"]
            is not None) for op in ("dequant f32", "dequant bf16"))
        say(f"page faults per call (fastest sample, 1 thread; output allocation): {faults}")


# -- a QLoRA layer, forward and backward ------------------------------------------------

def qlora_layer_step_time(in_features: int = 4096, out_features: int = 4096, tokens: int = 256,
                          r: int = 16, compute_dtype=None, repeat: int = 5, warmup: int = 1,
                          threads: int | None = None, seed: int = 0) -> dict:
    """Seconds for one forward + backward of a LoRA layer over a 4-bit base vs a 16-bit base.

    Both layers are ``qlora_ref.nn.LoRALinear.from_linear`` of the same
    ``nn.Linear`` (``quant_bits=4``: NF4, blocksize 64, double quantization;
    ``quant_bits=16``: the float weight, frozen). The step is
    ``layer(x).sum().backward()`` on ``x`` of shape ``(tokens, in_features)``
    with ``requires_grad`` (as inside a network). The 4-bit layer dequantizes
    its weight twice per step (forward, and again in backward); the time of
    one ``base_layer.dequantize`` is reported too.

    Returns
    -------
    dict
        ``{"4-bit": s, "16-bit": s, "dequantize": s, "forward 4-bit": s, "forward 16-bit": s}``
        (best of ``repeat``).
    """
    import torch

    from ..nn import LoRALinear

    compute_dtype = compute_dtype or torch.float32
    threads = threads or default_num_threads()
    previous = torch.get_num_threads(), os.environ.get("QLORA_REF_NUM_THREADS")
    torch.set_num_threads(threads)
    os.environ["QLORA_REF_NUM_THREADS"] = str(threads)   # the layer's dequantization kernels
    try:
        torch.manual_seed(seed)
        linear = torch.nn.Linear(in_features, out_features).to(compute_dtype)
        layers = {
            "4-bit": LoRALinear.from_linear(torch.nn.Linear(in_features, out_features),
                                            r=r, quant_bits=4, compute_dtype=compute_dtype),
            "16-bit": LoRALinear.from_linear(linear, r=r, quant_bits=16),
        }
        with torch.no_grad():
            layers["4-bit"].base_layer.bias.copy_(linear.bias.float())
        x = torch.randn(tokens, in_features, dtype=compute_dtype, requires_grad=True)

        def step(layer):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).sum().backward()

        def forward(layer):
            with torch.no_grad():
                layer(x)

        base = layers["4-bit"].base_layer
        rows = {name: (1, lambda layer=layer: step(layer)) for name, layer in layers.items()}
        rows.update({f"forward {name}": (1, lambda layer=layer: forward(layer))
                     for name, layer in layers.items()})
        rows["dequantize"] = (1, lambda: base.dequantize(compute_dtype))
        measured = _measure(rows, repeat, warmup)
        return {name: r["seconds"] for name, r in measured.items()}
    finally:
        torch.set_num_threads(previous[0])
        if previous[1] is None:
            del os.environ["QLORA_REF_NUM_THREADS"]
        else:
            os.environ["QLORA_REF_NUM_THREADS"] = previous[1]


def _print_layer(threads, repeat, warmup, fmt, say) -> dict:
    """The layer step in float32 on 1 and ``threads`` threads.

    (bfloat16 is left out of the default run: on a CPU without native
    bfloat16 arithmetic torch's bfloat16 matmuls are several times slower
    than float32 and would measure that, not the 4-bit base.)
    """
    out = {}
    say("\nLoRA layer 4096 -> 4096, r=16, 256 tokens, float32, forward + backward "
        f"(x.requires_grad); best of {repeat}:")
    for t in ([1] if threads == 1 else [1, threads]):
        r = qlora_layer_step_time(repeat=repeat, warmup=warmup, threads=t)
        out[f"{t} thr"] = r
        say(f"  {t} thr: step with 4-bit base {r['4-bit'] * 1e3:6.1f} ms, 16-bit base "
            f"{r['16-bit'] * 1e3:6.1f} ms (x{r['4-bit'] / r['16-bit']:.2f}); forward only "
            f"{r['forward 4-bit'] * 1e3:.1f} vs {r['forward 16-bit'] * 1e3:.1f} ms; "
            f"one dequantize of the base {r['dequantize'] * 1e3:.1f} ms (a step does two)")
    return out


# -- under contention ------------------------------------------------------------------------

#: The rows of :func:`contention_table`: label -> (environment changes, import torch first?).
#: ``GOMP_SPINCOUNT=300000`` is libgomp's documented default when ``OMP_WAIT_POLICY`` is
#: unset (what every process got before :mod:`qlora_ref._runtime`); setting it explicitly
#: counts as the user's choice, so the package leaves it alone.
CONTENTION_SETUPS = {
    "qlora_ref default": ({}, False),
    "torch imported first": ({}, True),
    "libgomp default (spins)": ({"GOMP_SPINCOUNT": "300000"}, False),
    "OMP_NUM_THREADS=1": ({"OMP_NUM_THREADS": "1"}, False),
}

_CONTENTION_STEPS = 30        # finetune steps per row
_CONTENTION_TIMEOUT_S = 400   # a row that takes longer is reported as "> 400 s"

# One row, in a fresh process (the wait policy is fixed when OpenMP loads):
# argv = steps, torch_first; prints one JSON line.
_CONTENTION_CHILD = r"""
import json, sys, tempfile, time
steps, torch_first = int(sys.argv[1]), sys.argv[2] == "1"
if torch_first:
    import torch
import numpy as np
import qlora_ref
from qlora_ref import _runtime, dequantize_4bit, quantize_4bit
from qlora_ref.backend import default_num_threads
out = {"policy": _runtime.openmp_policy(), "kernel threads": default_num_threads()}
rng = np.random.default_rng(0)
for rows, cols in ((128, 512), (4096, 4096)):
    x = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
    state = quantize_4bit(x, num_threads=1)
    spent, calls = {1: 0.0, 2: 0.0}, 0
    while calls < 5 or sum(spent.values()) < 1.0:   # 1 and 2 threads take turns
        for t in (1, 2):
            start = time.perf_counter()
            dequantize_4bit(state, num_threads=t)
            spent[t] += time.perf_counter() - start
        calls += 1
    for t in (1, 2):
        out[f"{rows}x{cols} {t} thr"] = spent[t] / calls
if steps:
    from qlora_ref.train.finetune import FinetuneConfig, finetune
    with tempfile.TemporaryDirectory() as tmp:
        result = finetune(FinetuneConfig(max_steps=steps), device="cpu", output_dir=tmp,
                          progress=False)
    out["steps/s"] = result.steps / result.seconds
import torch
out["torch threads"] = torch.get_num_threads()
print(json.dumps(out))
"""


@contextlib.contextmanager
def _busy_processes(count: int, seconds: float):
    """``count`` processes that spin on a core each; each exits after ``seconds`` by itself."""
    import subprocess

    code = f"import time\nend = time.monotonic() + {seconds:.0f}\nwhile time.monotonic() < end: pass"
    procs = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen([sys.executable, "-c", code]))
        time.sleep(1.0)  # let them reach the run queue
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def _contention_row(env_changes: dict, torch_first: bool, steps: int, timeout: float) -> dict:
    import json
    import subprocess

    from .._runtime import USER_SETTINGS

    env = {k: v for k, v in os.environ.items()
           if k not in (*USER_SETTINGS, "OMP_NUM_THREADS", "QLORA_REF_NUM_THREADS")}
    env.update(env_changes)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", _CONTENTION_CHILD, str(steps),
                               "1" if torch_first else "0"], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "load": load}
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"contention row failed:\n{done.stderr[-2000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row.update(seconds=seconds, load=load)
    return row


def contention_table(busy: int = 2, steps: int = _CONTENTION_STEPS, setups=None,
                     timeout: float = _CONTENTION_TIMEOUT_S, fmt: str = "text", file=None) -> dict:
    """Finetune and kernel threads while ``busy`` processes of the benchmark's own hog the CPUs.

    Each row of :data:`CONTENTION_SETUPS` runs in a fresh process (the
    OpenMP wait policy is read when the runtime loads): the dequantization
    to float32 of a 128 x 512 matrix (a tiny-GPT layer) and of a 4096 x 4096
    one on 1 and on 2 threads (the threads take turns; mean of at least 5
    calls and 1 s), then ``finetune`` for ``steps`` steps with the default
    configuration. "process s" is the child's whole wall time (imports,
    evaluation before and after, the steps); a child over ``timeout`` is
    stopped and shown as such.

    Returns
    -------
    dict
        ``{"busy": n, "steps": n, "rows": {label: {...}}}``.
    """
    file = file or sys.stdout
    say = lambda *a: print(*a, file=file, flush=True)  # noqa: E731
    setups = CONTENTION_SETUPS if setups is None else setups
    rows = {}
    say(f"Under contention: {busy} busy processes started by the benchmark; {os.cpu_count()} "
        f"cores; load average {os.getloadavg()[0]:.2f} before they start. Each row is a fresh "
        f"process: dequantize to float32 on 1 and 2 threads (mean per call), then finetune "
        f"{steps} steps (defaults).")
    with _busy_processes(busy, seconds=len(setups) * (timeout + 30) + 60):
        for label, (env_changes, torch_first) in setups.items():
            rows[label] = _contention_row(env_changes, torch_first, steps, timeout)

    head = ["setup", "load", "policy", "torch thr", "kernel thr", "128x512 1 thr us",
            "2 thr us", "4096^2 1 thr ms", "2 thr ms", "steps/s", "process s"]
    body = []
    for label, r in rows.items():
        if r["seconds"] is None:
            body.append([label, f"{r['load']:.1f}", *["-"] * 8, f"> {timeout:.0f}"])
            continue
        body.append([label, f"{r['load']:.1f}", r["policy"], str(r["torch threads"]),
                     str(r["kernel threads"]),
                     f"{r['128x512 1 thr'] * 1e6:.0f}", f"{r['128x512 2 thr'] * 1e6:.0f}",
                     f"{r['4096x4096 1 thr'] * 1e3:.1f}", f"{r['4096x4096 2 thr'] * 1e3:.1f}",
                     f"{r['steps/s']:.2f}" if "steps/s" in r else "-", f"{r['seconds']:.0f}"])
    _say_table(say, head, body, fmt)
    say(f"load average at the end {os.getloadavg()[0]:.2f}")
    return {"busy": busy, "steps": steps, "rows": rows}


# -- machine and versions ----------------------------------------------------------------

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
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "torch": version("torch"),
            "bitsandbytes": version("bitsandbytes"), "torchao": version("torchao"),
            "cython": version("Cython"),
            "openmp": bool(cython_available() and kernels().openmp_enabled())}


# -- command line ---------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add this benchmark's options to ``parser`` (for the ``qlora-ref bench`` subcommand)."""
    parser.add_argument("--size", nargs="+", default=None, metavar="N|RxC",
                        help="matrix sizes (default: 4096 256, i.e. 4096x4096 and 256x256)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of the multi-threaded rows (default: all cores)")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs, best kept (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="a fast look: 3 runs, sizes 1024 and 256, no layer timing")
    parser.add_argument("--no-layer", action="store_true",
                        help="skip the LoRA layer forward/backward timing")
    parser.add_argument("--format", choices=("text", "md"), default="text",
                        help="plain text or Markdown tables")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the matrices")
    parser.add_argument("--contention", nargs="?", type=int, const=2, default=None,
                        metavar="BUSY", help="instead of the tables: finetune and 1- vs 2-thread "
                        "kernels while BUSY (default 2) busy processes of the benchmark's own "
                        "load the CPUs, for each OpenMP setup (a few minutes)")
    parser.add_argument("--generate", action="store_true",
                        help="the generate table instead: decoding speed of a 4096x4096 layer "
                             "(1 and 8 tokens) and of two small models, 4-bit vs 16/32-bit, "
                             "on one thread (see qlora_ref/cli/bench_generate.py)")
    parser.add_argument("--fresh-pages", action="store_true",
                        help="do not set glibc to reuse heap memory: outputs may be new, "
                             "page-faulted memory (as in a fresh process)")
    return parser


def main(args=None) -> int:
    """Run from ``python -m qlora_ref.cli.bench`` (argv list or None) or a parsed ``Namespace``."""
    if not isinstance(args, argparse.Namespace):
        parser = add_arguments(argparse.ArgumentParser(
            prog="python -m qlora_ref.cli.bench", description=__doc__.split("\n\n")[0]))
        parser.add_argument("--report-json", help=argparse.SUPPRESS)  # the measuring child
        args = parser.parse_args(args)
    if args.contention is not None:
        check_int_range(args.contention, "--contention (busy processes)", 0, MAX_THREADS)
        contention_table(busy=args.contention, fmt=args.format)
        return 0
    if args.generate:
        from .bench_generate import generate_table

        generate_table(fmt=args.format, repeat=3 if args.quick else max(args.repeat, 5),
                       size=1024 if args.quick else 4096)
        return 0
    _check_options(args.threads, args.repeat, args.warmup)
    sizes = [_parse_size(s) for s in args.size or (["1024", "256"] if args.quick else ["4096", "256"])]
    repeat = 3 if args.quick else args.repeat
    options = dict(sizes=sizes, threads=args.threads, repeat=repeat, warmup=args.warmup,
                   seed=args.seed, layer=not (args.no_layer or args.quick), fmt=args.format)
    report_json = getattr(args, "report_json", None)
    if report_json:  # this is the child: a process of its own, so the allocator may change
        import json

        report = _run(**options, file=sys.stdout, heap_reuse=_reuse_heap_memory())
        with open(report_json, "w") as f:
            json.dump(report, f)
        return 0
    run_benchmarks(**options, fresh_pages=args.fresh_pages)
    return 0


#: For ``qlora-ref``: the one-line help; the benchmark has its own ``--seed`` and no ``--device``.
HELP = "quantize/dequantize/pack speed: NumPy, Cython (1 and all threads), bitsandbytes, memory copy"
COMMON = False
run = main


if __name__ == "__main__":
    raise SystemExit(main())
