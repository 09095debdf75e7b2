"""The Cython kernels and the NumPy reference agree byte for byte; CI requires the kernels."""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

import qlora_ref
from qlora_ref.backend import active_backend, resolve_backend

needs_cython = pytest.mark.skipif(not qlora_ref.cython_available(),
                                  reason="the Cython extension is not built in this environment")


def test_ci_builds_and_uses_the_extension():
    """Under QLORA_REF_REQUIRE_CYTHON (set by .ci/run) the kernels must be built and active."""
    if not os.environ.get("QLORA_REF_REQUIRE_CYTHON"):
        pytest.skip("QLORA_REF_REQUIRE_CYTHON is not set (only CI requires the extension)")
    assert qlora_ref.cython_available(), "the Cython extension was not built"
    assert active_backend() == "cython"


@needs_cython
@given(n=st.integers(1, 5000), seed=st.integers(0, 2**32 - 1),
       quant_type=st.sampled_from(["nf4", "fp4", "int4"]),
       blocksize=st.sampled_from([32, 64, 128, 256, 512, 1024, 2048, 4096]),
       double_quant=st.booleans(), num_threads=st.sampled_from([1, 2]))
def test_cython_equals_numpy_byte_for_byte(n, seed, quant_type, blocksize, double_quant, num_threads):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * rng.random() * 100).astype(np.float32)
    x[rng.random(n) < 0.05] = 0.0  # exact zeros, and sometimes whole zero blocks
    ref = qlora_ref.quantize_4bit(x, quant_type, blocksize, double_quant, backend="numpy")
    fast = qlora_ref.quantize_4bit(x, quant_type, blocksize, double_quant, backend="cython",
                                   num_threads=num_threads)
    assert fast.equals(ref)
    out_ref = qlora_ref.dequantize_4bit(ref, backend="numpy")
    out_fast = qlora_ref.dequantize_4bit(ref, backend="cython", num_threads=num_threads)
    np.testing.assert_array_equal(out_fast.view(np.uint32), out_ref.view(np.uint32))


def test_environment_variable_forces_the_reference(monkeypatch):
    monkeypatch.setenv("QLORA_REF_BACKEND", "numpy")
    assert active_backend() == "numpy"
    monkeypatch.setenv("QLORA_REF_BACKEND", "fortran")
    with pytest.raises(ValueError, match="QLORA_REF_BACKEND"):
        active_backend()


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("gpu")


def test_importing_the_numpy_core_does_not_import_torch():
    code = ("import sys, numpy as np, qlora_ref\n"
            "s = qlora_ref.quantize_4bit(np.ones(128, np.float32))\n"
            "qlora_ref.dequantize_4bit(s); qlora_ref.memory.bits_per_param()\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert 'bitsandbytes' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_main_command_prints_the_table_and_the_backend():
    result = subprocess.run([sys.executable, "-m", "qlora_ref", "info", "--size", "256"],
                            capture_output=True, text=True, check=True)
    out = result.stdout
    assert "0.07958030" in out and "-0.69619280" in out, "the NF4 table is printed"
    assert "4.5000" in out, "bits/param without double quantization at blocksize 64"
    assert "4.1274" in out or "4.1270" in out or "4.127" in out
    assert ("backend: cython" in out) == qlora_ref.cython_available()
