"""Re-execute the notebooks in place, storing their outputs, and print each one's runtime.

Usage (from anywhere)::

    python notebooks/execute.py                  # all notebooks
    python notebooks/execute.py 03 05            # those whose names start with 03 or 05

Each notebook runs top to bottom with nbclient (timeout 300 s per cell), in a
kernel started from *this* interpreter (``sys.executable``), with the
notebooks folder as working directory. Outputs are written back into the
``.ipynb`` files, which the documentation renders without executing them.
``tests/test_notebooks.py`` uses :func:`execute` too, without writing.
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


def notebooks(prefixes=()) -> list[Path]:
    """The notebooks in this folder, sorted; only those starting with one of ``prefixes`` if given."""
    found = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
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


def execute(path: Path, timeout: int = TIMEOUT) -> tuple[nbformat.NotebookNode, float]:
    """Run the notebook at ``path``; return the executed notebook and the seconds it took.

    Raises ``nbclient.exceptions.CellExecutionError`` naming the failing cell.
    """
    nb = nbformat.read(path, as_version=4)
    paths = os.environ.get("JUPYTER_PATH", "").split(os.pathsep)
    if _kernel_dir() not in paths:
        os.environ["JUPYTER_PATH"] = os.pathsep.join([_kernel_dir(), *filter(None, paths)])
    client = NotebookClient(nb, timeout=timeout, kernel_name=KERNEL_NAME, record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    started = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - started
    # store the generic kernel name, not the temporary one
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}
    return nb, seconds


def main(argv=None) -> int:
    paths = notebooks(argv if argv is not None else sys.argv[1:])
    if not paths:
        print("no notebooks matched", file=sys.stderr)
        return 1
    total = 0.0
    for path in paths:
        nb, seconds = execute(path)
        nbformat.write(nb, path)
        total += seconds
        size_kb = path.stat().st_size / 1024
        print(f"{path.name:<45} {seconds:6.1f} s  {size_kb:6.0f} KB", flush=True)
    print(f"{'total':<45} {total:6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
