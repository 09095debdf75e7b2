"""The process-wide OpenMP policy (``qlora_ref._runtime``), as a user's process meets it.

Every check runs in a fresh interpreter whose environment has no OpenMP
settings: the policy is fixed once per process, when the first OpenMP
runtime loads, and this test session has loaded one already.
"""
import json
import os
import subprocess
import sys

import pytest

import qlora_ref
from qlora_ref.backend import PARALLEL_MIN_ELEMENTS, default_num_threads

# what a user may have set; the subprocesses start without any of it
_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS",
             "QLORA_REF_NUM_THREADS")

needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/task"),
                                reason="counts threads in /proc/self/task (Linux only)")


def _run(code: str, **env_changes) -> dict:
    """Run ``code`` in a fresh interpreter; return the JSON object it prints last."""
    env = {k: v for k, v in os.environ.items() if k not in _SETTINGS}
    env.update(env_changes)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_pulls_in_neither_torch_nor_scipy_stats():
    out = _run("import json, sys, qlora_ref\n"
               "print(json.dumps({m: m in sys.modules for m in ('torch', 'scipy.stats')}))")
    assert out == {"torch": False, "scipy.stats": False}, \
        f"`import qlora_ref` imported {[m for m, v in out.items() if v]} (it should stay light)"


def test_cli_process_waits_passively_before_torch_loads():
    # the console script imports qlora_ref.cli, then a command imports torch
    out = _run("import json, os, sys\n"
               "import qlora_ref.cli\n"
               "before = {'torch': 'torch' in sys.modules, 'env': os.environ.get('OMP_WAIT_POLICY')}\n"
               "import torch\n"
               "from qlora_ref import _runtime\n"
               "print(json.dumps(dict(before, policy=_runtime.openmp_policy(),\n"
               "                      torch_threads=torch.get_num_threads())))")
    assert out["torch"] is False, "importing the CLI imported torch"
    assert out["env"] == "passive" and out["policy"] == "passive", out
    assert out["torch_threads"] >= 1


def test_openmp_runtime_in_use_reads_passive():
    """The runtime torch and the kernels share reports the policy (libgomp's omp_display_env)."""
    code = ("import ctypes, json, sys\n"
            "import qlora_ref, torch\n"
            "try:\n"
            "    display = ctypes.CDLL('libgomp.so.1').omp_display_env\n"
            "except (OSError, AttributeError):\n"
            "    print(json.dumps({'shown': None})); sys.exit(0)\n"
            "sys.stdout.flush(); display(0)\n"
            "print(json.dumps({'shown': True}))")
    env = {k: v for k, v in os.environ.items() if k not in _SETTINGS}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    if json.loads(done.stdout.strip().splitlines()[-1])["shown"] is None:
        pytest.skip("this libgomp has no omp_display_env (GCC < 9) or is not loaded")
    text = done.stdout + done.stderr
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in text, text[-2000:]


def test_torch_imported_first_falls_back_to_one_thread():
    out = _run("import json, os, torch, qlora_ref\n"
               "from qlora_ref import _runtime\n"
               "from qlora_ref.backend import default_num_threads\n"
               "print(json.dumps({'policy': _runtime.openmp_policy(),\n"
               "                  'torch_threads': torch.get_num_threads(),\n"
               "                  'kernel_threads': default_num_threads(1 << 24),\n"
               "                  'env': os.environ.get('OMP_WAIT_POLICY')}))")
    assert out == {"policy": "single-thread", "torch_threads": 1, "kernel_threads": 1,
                   "env": "passive"}, out


def test_a_user_choice_is_left_alone():
    out = _run("import json, os, torch\n"
               "threads = torch.get_num_threads()\n"
               "import qlora_ref\n"
               "from qlora_ref import _runtime\n"
               "print(json.dumps({'policy': _runtime.openmp_policy(),\n"
               "                  'unchanged': torch.get_num_threads() == threads,\n"
               "                  'env': os.environ.get('OMP_WAIT_POLICY')}))",
               OMP_WAIT_POLICY="active")
    assert out == {"policy": "user", "unchanged": True, "env": "active"}, out


def test_small_problems_get_one_thread(monkeypatch):
    monkeypatch.delenv("QLORA_REF_NUM_THREADS", raising=False)
    monkeypatch.setattr(qlora_ref._runtime, "_policy", "passive")
    assert default_num_threads(128 * 512) == 1          # a tiny-GPT layer
    assert default_num_threads(PARALLEL_MIN_ELEMENTS - 1) == 1
    assert default_num_threads(PARALLEL_MIN_ELEMENTS) == default_num_threads()
    monkeypatch.setenv("QLORA_REF_NUM_THREADS", "3")  # an explicit count wins
    assert default_num_threads(16) == 3


_COUNT_THREADS = """
import json, os
import numpy as np
import qlora_ref
from qlora_ref.backend import default_num_threads, kernels
%s
def threads():
    return len(os.listdir('/proc/self/task'))
rng = np.random.default_rng(0)
small = qlora_ref.quantize_4bit(rng.standard_normal((128, 512), dtype=np.float32), num_threads=1)
big = qlora_ref.quantize_4bit(rng.standard_normal((1024, 1024), dtype=np.float32), num_threads=1)
before = threads()
%s
after_small = threads()
qlora_ref.dequantize_4bit(big, num_threads=default_num_threads(big.n_elements))
print(json.dumps({'before': before, 'after_small': after_small, 'after_big': threads(),
                  'cores': default_num_threads(), 'openmp': kernels().openmp_enabled()}))
"""


@needs_proc
@pytest.mark.skipif(not qlora_ref.cython_available(), reason="the Cython extension is not built")
@pytest.mark.parametrize("path", ["backend", "torch layer"])
def test_a_small_kernel_call_starts_no_second_thread(path):
    """A tiny-GPT-sized dequantization runs on the calling thread: no OpenMP worker appears.

    The 1024 x 1024 call afterwards is the control: with two or more cores
    its parallel region starts the pool's workers, so counting threads in
    ``/proc/self/task`` does see a parallel call. "torch layer" is the path
    the tiny GPT takes (``qlora_ref.nn.functional.dequantize_4bit_torch``).
    """
    if path == "backend":
        setup, call = "", "qlora_ref.dequantize_4bit(small, num_threads=default_num_threads(small.n_elements))"
    else:
        setup = "import torch\nfrom qlora_ref.nn.functional import dequantize_4bit_torch\n"
        call = "dequantize_4bit_torch(small, backend='cython')"
    out = _run(_COUNT_THREADS % (setup, call))
    assert out["after_small"] == out["before"], \
        f"a 128x512 dequantization started {out['after_small'] - out['before']} thread(s)"
    if out["cores"] >= 2 and out["openmp"]:
        assert out["after_big"] > out["before"], "control: the 1024x1024 call ran in parallel"
