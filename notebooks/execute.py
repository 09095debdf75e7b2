"""Re-execute the notebooks in place, storing their outputs, and print each one's runtime.

Usage (from anywhere)::

    python notebooks/execute.py                  # all notebooks
    python notebooks/execute.py 03 05            # those whose names start with 03 or 05
    python notebooks/execute.py --solutions 01   # run with the exercise solutions, store nothing
    python notebooks/execute.py appendix         # the appendices (appendix_*.ipynb) only

Each notebook runs top to bottom with nbclient (timeout 300 s per cell), in a
kernel started from *this* interpreter (``sys.executable``), with the
notebooks folder as working directory. Outputs are written back into the
``.ipynb`` files, which the documentation renders without executing them.
``tests/docs/test_notebooks.py`` uses :func:`execute` too, without writing.

The stored outputs are the student's view: the exercises hold their
placeholders and every check prints ``[not done]``. ``--solutions`` runs the
kernel with ``QLORA_REF_SOLUTIONS=1`` (see ``exercises.py``: every check then
uses the solution in ``solutions/`` and must pass); it never writes the files.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
TIMEOUT = 300
KERNEL_NAME = "qlora-ref-python"
SOLUTIONS_VARIABLE = "QLORA_REF_SOLUTIONS"


def notebooks(prefixes=()) -> list[Path]:
    """The numbered course notebooks (``NN_*.ipynb``), sorted; only those starting with one of ``prefixes`` if given."""
    found = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    return [p for p in found if not prefixes or p.name.startswith(tuple(prefixes))]


def appendices(prefixes=()) -> list[Path]:
    """The appendix notebooks (``appendix_*.ipynb``: optional reading, no exercises), sorted; filtered as above."""
    found = sorted(HERE.glob("appendix_*.ipynb"))
    return [p for p in found if not prefixes or p.name.startswith(tuple(prefixes))]


@functools.lru_cache(maxsize=None)
def _kernel_dir() -> str:
    """A Jupyter data folder holding one kernelspec that starts sys.executable's ipykernel.

    Put first on ``JUPYTER_PATH``, so that no other "python3" kernel (a user's,
    another environment's) can be picked up instead.
    """
    root = Path(tempfile.mkdtemp(prefix="qlora-ref-kernel-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (qlora_ref)", "language": "python"}))
    return str(root)


def execute(path: Path, timeout: int = TIMEOUT,
            extra_env: dict[str, str] | None = None) -> tuple[nbformat.NotebookNode, float]:
    """Run the notebook at ``path``; return the executed notebook and the seconds it took.

    The kernel gets this process's environment without ``QLORA_REF_SOLUTIONS``,
    plus ``extra_env`` (``{"QLORA_REF_SOLUTIONS": "1"}`` runs the exercises
    with their solutions).
    Raises ``nbclient.exceptions.CellExecutionError`` naming the failing cell.
    """
    nb = nbformat.read(path, as_version=4)
    paths = os.environ.get("JUPYTER_PATH", "").split(os.pathsep)
    if _kernel_dir() not in paths:
        os.environ["JUPYTER_PATH"] = os.pathsep.join([_kernel_dir(), *filter(None, paths)])
    client = NotebookClient(nb, timeout=timeout, kernel_name=KERNEL_NAME, record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    # the student's view unless extra_env asks otherwise: an inherited QLORA_REF_SOLUTIONS is dropped
    env = {k: v for k, v in os.environ.items() if k != SOLUTIONS_VARIABLE}
    env.update(extra_env or {})
    started = time.perf_counter()
    client.execute(env=env)                   # passed on to the kernel's process
    seconds = time.perf_counter() - started
    # store the generic kernel name, not the temporary one
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}
    return nb, seconds


def _write_atomically(nb: nbformat.NotebookNode, path: Path) -> None:
    """Write ``nb`` to ``path`` through a temporary file in the same folder (never half-written)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".ipynb", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            nbformat.write(nb, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    with_solutions = "--solutions" in args
    prefixes = [a for a in args if a != "--solutions"]
    unknown = [a for a in prefixes if a.startswith("-")]
    if unknown:
        print(f"execute.py: unknown option {unknown[0]} (only --solutions)", file=sys.stderr)
        return 2
    paths = notebooks(prefixes) + appendices(prefixes)
    if not paths:
        print("no notebooks matched", file=sys.stderr)
        return 1
    total = 0.0
    for path in paths:
        if with_solutions:
            nb, seconds = execute(path, extra_env={SOLUTIONS_VARIABLE: "1"})
            size = "(not written)"
        else:
            nb, seconds = execute(path)
            _write_atomically(nb, path)
            size = f"{path.stat().st_size / 1024:6.0f} KB"
        total += seconds
        print(f"{path.name:<45} {seconds:6.1f} s  {size}", flush=True)
    print(f"{'total':<45} {total:6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
