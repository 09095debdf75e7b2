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
"""
from __future__ import annotations

import os
import warnings

__all__ = ["BACKENDS", "active_backend", "resolve_backend", "cython_available", "kernels",
           "default_num_threads"]

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
    return _quant4


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


def default_num_threads() -> int:
    """Threads the Cython kernels use by default: ``QLORA_REF_NUM_THREADS`` or all cores."""
    value = os.environ.get("QLORA_REF_NUM_THREADS")
    if value:
        return max(1, int(value))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else (os.cpu_count() or 1))
