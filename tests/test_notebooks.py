"""Every notebook runs top to bottom without an error (and within the course's time budget).

Each notebook is executed with nbclient in memory (the file on disk is not
touched), with the notebooks folder as working directory and a kernel started
from this interpreter, through ``notebooks/execute.py``, the same code that
refreshes their stored outputs. A notebook's exercise-check cells are
``assert`` statements, so a wrong answer or a changed result fails here.
"""
import importlib.util
from pathlib import Path

import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
_spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS_DIR / "execute.py")
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)

#: The course promises each notebook runs in under 2 minutes on a 2-core CPU.
BUDGET_SECONDS = 120
NOTEBOOKS = runner.notebooks()


def test_the_eight_notebooks_are_there():
    names = [p.name[:2] for p in NOTEBOOKS]
    assert names == [f"{i:02d}" for i in range(1, 9)], names


def _has_error(nb) -> list:
    return [o for cell in nb.cells if cell.cell_type == "code"
            for o in cell.get("outputs", []) if o.get("output_type") == "error"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb, seconds = runner.execute(path, timeout=runner.TIMEOUT)   # raises on the first failing cell
    assert not _has_error(nb)
    assert seconds < BUDGET_SECONDS, (
        f"{path.name} took {seconds:.0f} s; the budget is {BUDGET_SECONDS} s on a 2-core CPU")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_outputs_are_clean(path):
    """The committed notebook was executed in full (the docs show these outputs) and is small."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    assert all(counts), f"{path.name}: cells without stored outputs; run notebooks/execute.py"
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: not executed top to bottom once"
    assert not _has_error(nb), f"{path.name}: a stored output is an error"
    stderr = [o for c in code for o in c.get("outputs", []) if o.get("name") == "stderr"]
    assert not stderr, f"{path.name}: stored stderr output: {stderr[0].get('text', '')[:200]}"
    assert path.stat().st_size < 300 * 1024, f"{path.name} is over 300 KB"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", [])), \
        f"{path.name}: no plot in the stored outputs"
