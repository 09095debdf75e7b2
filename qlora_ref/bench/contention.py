"""What a user of a *shared* machine meets: fine-tuning and kernel threads next to busy processes.

``qlora-ref bench --contention`` prints :func:`contention_table` (see
:mod:`qlora_ref.bench`, and ``docs/benchmarks.md`` for a run).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

from .table import say_table

__all__ = ["contention_table", "CONTENTION_SETUPS"]


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
    say_table(say, head, body, fmt)
    say(f"load average at the end {os.getloadavg()[0]:.2f}")
    return {"busy": busy, "steps": steps, "rows": rows}
