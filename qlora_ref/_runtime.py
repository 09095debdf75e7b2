"""How the OpenMP threads of this process wait: chosen once, when ``qlora_ref`` is imported.

The problem. torch's CPU ops and our Cython kernels run parallel regions on
OpenMP (GNU libgomp). Left to its defaults, libgomp keeps a thread that has
finished its share *spinning* for about 300,000 iterations before it
sleeps. On an idle machine with cores to spare that saves a wake-up; on a
shared machine it is a disaster: the spinning thread holds a core that the
thread everyone waits for needs, and a parallel region can stall for a
whole scheduler time slice. The tiny GPT runs thousands of small regions
per step.

The choice. Unless the user has chosen (any of ``OMP_WAIT_POLICY``,
``GOMP_SPINCOUNT``, ``KMP_BLOCKTIME`` set), :func:`apply_openmp_policy`
sets ``OMP_WAIT_POLICY=passive`` (waiting threads sleep at once) and keeps
all cores. libgomp reads the variable once, when it is loaded, so this must
happen before the first OpenMP library loads: ``qlora_ref/__init__.py``
calls it before the extension is imported, and the CLI and the benchmark
import ``qlora_ref`` before torch.

One runtime, not two. torch's wheel bundles its own ``libgomp.so.1`` and the
extension links the system's, but a process uses only the first one
loaded: torch imported first is loaded into the global symbol scope, and
the extension's ``GOMP_*`` calls bind to it; the extension imported first
loads the system libgomp, and torch's libraries then bind to that one
(checked with ``LD_DEBUG=bindings``). So the wait policy of *both* pools is
whatever the environment said when the first of them loaded.

Too late: torch imported first. A notebook that runs ``import torch`` before
``import qlora_ref`` has a runtime that already spins, and no API changes
that. Then (unless the user chose, as above, or set ``OMP_NUM_THREADS``)
torch's intra-op threads are set to 1 (``torch.set_num_threads(1)``) and
the kernels run on one thread (:func:`single_threaded`, read by
:func:`qlora_ref.backend.default_num_threads`): a region of one thread has
no one to wait for. ``OMP_WAIT_POLICY=passive`` is still set, for child
processes. Import ``qlora_ref`` before torch to keep both cores.

Measured (the tiny GPT's ``finetune`` job, training steps per second, on
the 2-core VM with two busy processes added and other jobs running, load
average 3-8; more in ``docs/benchmarks.md``, "Under contention")::

    libgomp default (spins)                         0.14 - 0.5
    OMP_WAIT_POLICY=passive, all cores (chosen)     3.1 - 5.5
    OMP_NUM_THREADS=1                               3.6 - 4.2
    torch imported first, then the fallback         3.0 - 4.4

Alternating torch's thread count inside one passive process (so that the
load hits both alike): 4.8 steps/s on two threads against 4.2 on one
under the two busy processes; without them, 9.4 against 12.3.

The cost: on a quiet machine spinning wins on many tiny regions (14.9
against 7.9 steps/s in one quiet moment), and one thread beats two; each
passive region pays a futex wake-up. But spinning collapses by 10-30x as
soon as the cores are shared, and a reference package is run on laptops
and shared machines: it takes the policy that never collapses.
"""
from __future__ import annotations

import os
import sys

__all__ = ["USER_SETTINGS", "apply_openmp_policy", "openmp_policy", "single_threaded"]

#: Environment variables by which a user has already decided how OpenMP threads wait.
USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")

_OPENMP_LIBRARIES = ("libgomp", "libomp", "libiomp")

_policy: str | None = None


def _openmp_loaded() -> bool:
    """Is an OpenMP runtime already mapped into this process (so it has read its environment)?"""
    try:
        with open("/proc/self/maps") as maps:
            return any(lib in line for line in maps for lib in _OPENMP_LIBRARIES)
    except OSError:  # not Linux: torch is the OpenMP user we know of
        return "torch" in sys.modules


def apply_openmp_policy() -> str:
    """Choose how OpenMP threads wait (once per process); return what was done.

    Returns
    -------
    str
        ``"user"`` -- the user set one of :data:`USER_SETTINGS`; nothing changed;
        ``"passive"`` -- ``OMP_WAIT_POLICY=passive`` set before any OpenMP runtime loaded;
        ``"single-thread"`` -- a runtime had loaded already with the spinning default
        (torch imported first): torch and the kernels run on one thread.
    """
    global _policy
    if _policy is not None:
        return _policy
    if any(os.environ.get(name) for name in USER_SETTINGS):
        _policy = "user"
        return _policy
    late = _openmp_loaded()
    os.environ["OMP_WAIT_POLICY"] = "passive"   # read by every OpenMP runtime loaded from now on
    if not late:
        _policy = "passive"
        return _policy
    _policy = "single-thread"
    torch = sys.modules.get("torch")
    if torch is not None and not os.environ.get("OMP_NUM_THREADS") \
            and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(1)                # no second thread to spin
    return _policy


def openmp_policy() -> str | None:
    """What :func:`apply_openmp_policy` did in this process (None if it has not run)."""
    return _policy


def single_threaded() -> bool:
    """True when the kernels must run on one thread: the OpenMP runtime in use spins."""
    return _policy == "single-thread"
