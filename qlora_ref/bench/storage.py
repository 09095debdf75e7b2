r"""The storage table: quantize, dequantize, pack and unpack, per implementation and thread count.

Rows (:class:`Row`): the NumPy reference; the Cython kernels on 1 and on
``threads`` threads; bitsandbytes' CPU path and torchao's ``NF4Tensor``
when they import (:class:`Libraries`); ``np.copyto`` of as many bytes as the
operation writes, the bandwidth limit. :func:`run_benchmarks` times them
(:func:`qlora_ref.bench.timing.measure`) and prints one table per size; the
method is in :mod:`qlora_ref.bench`.
"""
from __future__ import annotations

import copy
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import packing
from ..backend import cython_available, default_num_threads, kernels
from ..fourbit import dequantize_4bit, quantize_4bit
from ..validation import check_int_range, check_num_threads
from .layer import print_layer
from .table import say_table
from .timing import (SLOW_CALL_S, dynamo_disabled, machine_info, measure, omp_set_num_threads,
                     process_settings)

__all__ = ["OPERATIONS", "Row", "Libraries", "run_benchmarks", "run_here", "check_options"]

#: Columns of the table, in order.
OPERATIONS = ("quantize", "dequant f32", "dequant bf16", "pack", "unpack")

#: Rows whose label carries no thread count (they run on one thread).
_ONE_THREAD = ("numpy reference", "memory copy")


@dataclass(frozen=True)
class Row:
    """One implementation of one operation: who computes it, on how many threads, and the call."""

    library: str          # "numpy reference", "cython", "bitsandbytes", "torchao NF4", "memory copy"
    threads: int
    fn: Callable = field(compare=False, repr=False)

    @property
    def label(self) -> str:
        """The row's name in the table and the report: ``"cython, 4 thr"``, ``"memory copy"``."""
        return self.library if self.library in _ONE_THREAD else f"{self.library}, {self.threads} thr"


@dataclass
class Libraries:
    """The optional libraries a run compares against (None: not importable), and its notes."""

    bitsandbytes: object = None        # bitsandbytes.functional
    to_nf4: Callable | None = None     # torchao's NF4 constructor
    set_omp_threads: Callable = lambda n: None   # the system libgomp's omp_set_num_threads
    notes: list = field(default_factory=list)    # lines printed under the next table


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


def _rows_for(op: str, x, state, codes, threads: int, libs: Libraries, cache: dict) -> list[Row]:
    """The rows of one operation: ours, the other libraries', and a memory copy of the output's size.

    A missing library gives no rows; ``cache`` keeps the other libraries'
    quantized forms of ``x`` between operations.
    """
    counts = [1] if threads == 1 else [1, threads]
    rows = _our_rows(op, x, state, codes, counts)
    if op in ("quantize", "dequant f32", "dequant bf16"):
        import torch

        xt = torch.from_numpy(x)
        if libs.bitsandbytes is not None:
            rows += _bitsandbytes_rows(op, xt, counts, libs.bitsandbytes, cache)
        if libs.to_nf4 is not None:
            rows += _torchao_rows(op, xt, counts, libs.to_nf4, cache, libs.notes)
    # the bandwidth limit: copy as many bytes as the operation writes
    n = x.size
    out_bytes = {"quantize": state.nbytes, "dequant f32": 4 * n, "dequant bf16": 2 * n,
                 "pack": (n + 1) // 2, "unpack": n}[op]
    src, dst = _copy_buffers(out_bytes)
    rows.append(Row("memory copy", 1, lambda: np.copyto(dst, src)))
    return rows


def _our_rows(op: str, x, state, codes, counts: list) -> list[Row]:
    """The NumPy reference (one thread) and the Cython kernels (each thread count)."""
    n = x.size
    k = kernels() if cython_available() else None
    if op == "quantize":
        rows = [Row("numpy reference", 1, lambda: quantize_4bit(x, backend="numpy"))]
        fast = lambda t: quantize_4bit(x, backend="cython", num_threads=t)  # noqa: E731
    elif op in ("dequant f32", "dequant bf16"):
        dtype = "float32" if op == "dequant f32" else "bfloat16"
        rows = [Row("numpy reference", 1, lambda: dequantize_4bit(state, dtype, backend="numpy"))]
        fast = lambda t: dequantize_4bit(state, dtype, backend="cython", num_threads=t)  # noqa: E731
    elif op == "pack":
        rows = [Row("numpy reference", 1, lambda: packing.pack_nibbles(codes, pad=7))]

        def fast(t):
            out = np.empty((n + 1) // 2, np.uint8)
            k.pack_nibbles(codes, 7, out, t)
            return out
    else:  # unpack
        rows = [Row("numpy reference", 1, lambda: packing.unpack_nibbles(state.packed, n))]

        def fast(t):
            out = np.empty(n, np.uint8)
            k.unpack_nibbles(state.packed, out, t)
            return out
    return rows + [Row("cython", t, lambda t=t: fast(t)) for t in (counts if k else [])]


def _bitsandbytes_rows(op: str, xt, counts: list, F, cache: dict) -> list[Row]:
    """bitsandbytes' ``quantize_4bit`` / ``dequantize_4bit`` (NF4, double quantization)."""
    import torch

    quantize = lambda: F.quantize_4bit(xt, blocksize=64, compress_statistics=True,  # noqa: E731
                                       quant_type="nf4")
    if op == "quantize":
        return [Row("bitsandbytes", t, quantize) for t in counts]
    if "bitsandbytes" not in cache:
        cache["bitsandbytes"] = quantize()
    q, qs = cache["bitsandbytes"]
    qs_out = copy.copy(qs)  # the output dtype is a field of bitsandbytes' QuantState
    qs_out.dtype = torch.float32 if op == "dequant f32" else torch.bfloat16
    return [Row("bitsandbytes", t, lambda: F.dequantize_4bit(q, qs_out)) for t in counts]


def _torchao_rows(op: str, xt, counts: list, to_nf4, cache: dict, notes: list) -> list[Row]:
    """torchao's ``NF4Tensor`` (whole groups of 256 blocks only: a note says when it has none)."""
    import torch

    if "torchao" not in cache:
        try:  # torchao wants whole groups of 256 blocks: n % 16384 == 0
            cache["torchao"] = to_nf4(xt, 64, 256)
        except (AssertionError, RuntimeError, ValueError) as exc:
            cache["torchao"] = None
            notes.append(f"torchao NF4: no rows for shape {tuple(xt.shape)} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0]})")
    nf4 = cache["torchao"]
    if nf4 is None:
        return []
    fn = {"quantize": lambda: to_nf4(xt, 64, 256),
          "dequant f32": nf4.get_original_weight,
          "dequant bf16": lambda: nf4.to(torch.bfloat16)}[op]
    return [Row("torchao NF4", t, fn) for t in counts]


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


def _thread_setter(libs: Libraries):
    """Set torch's intra-op threads and the system libgomp's (bitsandbytes' C kernels)."""
    import torch

    omp = libs.set_omp_threads

    def set_threads(t):
        torch.set_num_threads(t)
        omp(t)
    return set_threads


def _same_bytes(op: str, results: dict, rows: dict) -> bool | None:
    """Are the Cython results byte-identical to the NumPy reference's? (None: nothing to compare)"""
    import torch

    ref = results.get("numpy reference")
    fast = [v for name, v in results.items() if rows[name].library == "cython"]
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


def check_options(threads, repeat, warmup) -> None:
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
    check_options(threads, repeat, warmup)
    file = file or sys.stdout
    if not fresh_pages:
        return _run_in_child(sizes, threads, repeat, warmup, seed, layer, fmt, file)
    with process_settings():
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # read if torch is first imported now
        return run_here(sizes, threads, repeat, warmup, seed, layer, fmt, file, heap_reuse=False)


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


def run_here(sizes, threads, repeat, warmup, seed, layer, fmt, file, heap_reuse: bool) -> dict:
    """The measurement itself, in this process (``heap_reuse``: ``mallopt`` was set for it)."""
    import torch

    threads = threads or default_num_threads()
    bitsandbytes, bnb_note = _load_bitsandbytes()
    to_nf4, tao_note = _load_torchao()
    libs = Libraries(bitsandbytes, to_nf4, omp_set_num_threads())
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
        f"best of {repeat} (3 for calls over {SLOW_CALL_S:.0f} s) after {warmup} warm-up; "
        f"TORCHDYNAMO_DISABLE={os.environ.get('TORCHDYNAMO_DISABLE')}; "
        f"outputs {'reuse heap memory (mallopt)' if heap_reuse else 'may be fresh pages'}; "
        f"load average {os.getloadavg()[0]:.2f}")
    if bnb_note:
        say(f"bitsandbytes: {bnb_note}")
    if tao_note:
        say(f"torchao: {tao_note}")

    previous_threads = torch.get_num_threads()
    with dynamo_disabled():
        try:
            for rows_, cols in sizes:
                key = f"{rows_}x{cols}"
                report["sizes"][key] = _bench_size(rows_, cols, threads, repeat, warmup, seed,
                                                   libs, fmt, say)
        finally:
            torch.set_num_threads(previous_threads)
            libs.set_omp_threads(previous_threads)
    if layer:
        try:
            import qlora_ref.nn  # noqa: F401
        except ImportError as exc:
            say(f"\nLoRA layer step: qlora_ref.nn is not importable ({exc}); skipped")
        else:
            report["layer"] = print_layer(threads, repeat, warmup, fmt, say)
    say(f"load average at the end {os.getloadavg()[0]:.2f}")
    return report


def _bench_size(rows_, cols, threads, repeat, warmup, seed, libs, fmt, say) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows_, cols), dtype=np.float32) * np.float32(0.02)
    state = quantize_4bit(x)                               # NF4, blocksize 64, double quant
    codes = packing.unpack_nibbles(state.packed, x.size)   # (n,) uint8 codes 0..15
    n = x.size
    results, same, cache, by_label = {}, {}, {}, {}
    for op in OPERATIONS:
        rows = {row.label: row for row in _rows_for(op, x, state, codes, threads, libs, cache)}
        by_label.update(rows)
        measured = measure({label: (row.threads, row.fn) for label, row in rows.items()},
                           repeat, warmup, _thread_setter(libs))
        same[op] = _same_bytes(op, {name: r.pop("result") for name, r in measured.items()}, rows)
        for r in measured.values():
            r["melem_s"] = n / r["seconds"] / 1e6
            r["cpu_melem_s"] = None if r["cpu_seconds"] is None else n / r["cpu_seconds"] / 1e6
        results[op] = measured
    title = f"{rows_}x{cols} float32 ({n / 1e6:.3g} M elements, {x.nbytes / 2**20:.3g} MiB)"
    _print_table(title, results, by_label, same, fmt, say, clock="wall")
    _print_table(title, results, by_label, same, fmt, say, clock="cpu")
    for note in libs.notes:
        say(note)
    libs.notes.clear()
    return {"results": results, "byte_identical": same}


def _print_table(title, results, rows: dict, same, fmt, say, clock="wall"):
    """One table: a row per implementation (``rows``: label -> :class:`Row`), a column per operation.

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
        ref = results[op].get(Row("bitsandbytes", rows[name].threads, None).label)
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
        if rows[name].library == "cython":
            body.append([f"{name}: % of copy", *(share(op, name) for op in OPERATIONS)])
    numpy_ref = "numpy reference"
    for name in labels:
        if rows[name].library == "cython" and numpy_ref in labels:
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
    say_table(say, head, body, fmt)
    copies = ", ".join(f"{op} {results[op]['memory copy'][key] * 1e3:.3g} ms"
                       for op in OPERATIONS)
    say(f"memory copy = np.copyto of the bytes each operation writes: {copies}")
    if clock == "wall":
        faults = "; ".join(f"{op}: " + ", ".join(
            f"{rows[name].library} {r['page_faults']:.0f}"
            for name, r in results[op].items() if rows[name].library not in _ONE_THREAD
            and rows[name].threads == 1 and r["page_faults"] is not None) for op in ("dequant f32", "dequant bf16"))
        say(f"page faults per call (fastest sample, 1 thread; output allocation): {faults}")
