"""Which implementation runs: the NumPy reference or the Cython kernels.

The choice is made here, in Python, never inside a kernel:

* ``backend="numpy"`` or ``"cython"`` on a call picks one explicitly
  (asking for Cython when it was not built is an error);
* ``backend=None`` (the default) means Cython when the extension is built,
  else NumPy, unless the environment variable ``QLORA_REF_BACKEND=numpy``
  forces the reference;
* :func:`active_backend` reports what ``None`` resolves to.

Installing never needs a compiler: without the extension the package warns
once and uses NumPy. CI sets ``QLORA_REF_REQUIRE_CYTHON=1``, under which a
missing extension is an error instead.

The vector path of the dequantize kernels is chosen here as well
(:func:`simd_level`): the best the CPU has (``avx512bf16``, ``avx512``,
``avx2`` or ``portable``, see ``qlora_ref/_kernels/lookup16.h``), unless
``QLORA_REF_SIMD`` names another; every path writes the same bytes.

Threads are chosen here too (:func:`default_num_threads`): all cores for
large problems, one below :data:`PARALLEL_MIN_ELEMENTS`, one always when
the OpenMP runtime in use spins (see :mod:`qlora_ref._runtime`).
"""
from __future__ import annotations

import os
import warnings

from . import _runtime

__all__ = ["BACKENDS", "active_backend", "resolve_backend", "cython_available", "kernels",
           "default_num_threads", "PARALLEL_MIN_ELEMENTS", "simd_level"]

BACKENDS = ("numpy", "cython")

try:  # the compiled twin of the NumPy modules
    from ._kernels import quant4 as _quant4
except ImportError as exc:  # pragma: no cover - depends on the build
    _quant4 = None
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None

_warned = False


def cython_available() -> bool:
    """True if the Cython extension ``qlora_ref._kernels.quant4`` was built and imports."""
    return _quant4 is not None


def kernels():
    """The compiled kernel module (raises ``RuntimeError`` if it is not built)."""
    if _quant4 is None:
        raise RuntimeError(
            "the Cython extension qlora_ref._kernels.quant4 is not built "
            f"({_IMPORT_ERROR}); reinstall with a C compiler, e.g. `pip install -e .`")
    if not _simd_chosen:
        _choose_simd()
    return _quant4


_simd_chosen = False


def _choose_simd() -> None:
    """Apply ``QLORA_REF_SIMD`` (``auto``, ``portable``, ``avx2``, ``avx512``, ``avx512bf16``) once, on first use."""
    global _simd_chosen
    wanted = os.environ.get("QLORA_REF_SIMD", "").strip().lower() or "auto"
    _simd_chosen = True
    try:
        _quant4.set_simd_level(wanted)
    except ValueError as exc:
        raise ValueError(f"QLORA_REF_SIMD: {exc}") from None


def simd_level() -> str | None:
    """The vector path the dequantize kernels use (``"avx512bf16"``, ``"avx512"``, ``"avx2"``,
    ``"portable"``); None without the extension."""
    return kernels().simd_level() if _quant4 is not None else None


def active_backend() -> str:
    """The backend used when a function is called with ``backend=None``."""
    global _warned
    forced = os.environ.get("QLORA_REF_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"QLORA_REF_BACKEND must be one of {BACKENDS}, got {forced!r}")
        if forced == "cython":
            kernels()
        return forced
    if _quant4 is not None:
        return "cython"
    if os.environ.get("QLORA_REF_REQUIRE_CYTHON"):
        kernels()  # raises with the import error
    if not _warned:
        warnings.warn("qlora_ref: the Cython extension is not built; using the NumPy reference "
                      "(same results, slower).", RuntimeWarning, stacklevel=3)
        _warned = True
    return "numpy"


def resolve_backend(backend: str | None) -> str:
    """Validate an explicit ``backend`` argument, or resolve ``None`` with :func:`active_backend`."""
    if backend is None:
        return active_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "cython":
        kernels()
    return backend


#: Problems with fewer elements run on one thread. Measured on the 2-core VM
#: (dequantize to float32, mean of >= 1 s of calls, ``OMP_WAIT_POLICY=passive``):
#: with other jobs only (load 4.6) two threads took 2.4x, 1.3x, 1.1x and 0.95x
#: the one-thread time at 4,096, 65,536, 262,144 and 1,048,576 elements; with
#: two busy processes added, 0.8x, 0.44x, 0.7x and 0.45x. Waking the second
#: thread costs about 10-30 us, which a call must be long enough to repay:
#: the tiny GPT's 128 x 512 weights (65,536) stay on one thread.
PARALLEL_MIN_ELEMENTS = 1 << 18


def default_num_threads(n_elements: int | None = None) -> int:
    """Threads the Cython kernels use for a call on ``n_elements`` values.

    ``QLORA_REF_NUM_THREADS`` if set; else 1 when the OpenMP runtime in use
    spins while it waits (torch was imported before ``qlora_ref``; see
    :mod:`qlora_ref._runtime`) or when ``n_elements`` is below
    :data:`PARALLEL_MIN_ELEMENTS`; else all cores this process may use.
    """
    value = os.environ.get("QLORA_REF_NUM_THREADS")
    if value:
        return max(1, int(value))
    if _runtime.single_threaded():
        return 1
    if n_elements is not None and n_elements < PARALLEL_MIN_ELEMENTS:
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else (os.cpu_count() or 1))
