"""The floors of the package, checked on its source: the core never reaches up.

core (NumPy: codebooks, blockwise, packing, double_quant, fourbit, quant_state,
validation, dtypes, backend, memory) -> kernels (_kernels) -> torch layer (nn,
optim, interop) -> training (train) -> the command line and the benchmark.
A module may import from its own floor and the floors below it, never above;
the NumPy core imports neither torch nor bitsandbytes at module level.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qlora_ref"
CORE = ["codebooks", "blockwise", "packing", "double_quant", "fourbit", "quant_state", "_runtime",
        "validation", "dtypes", "backend", "memory"]
ABOVE_THE_CORE = ("qlora_ref.nn", "qlora_ref.optim", "qlora_ref.train", "qlora_ref.cli",
                  "qlora_ref.bench", "qlora_ref.interop")


def imported_modules(path: Path, top_level_only: bool):
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = "qlora_ref"  # every core module sits directly in the package
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package if node.level == 1 else package.rsplit(".", node.level - 1)[0]
                module = f"{base}.{node.module}" if node.module else base
                if node.module is None:
                    for alias in node.names:
                        yield f"{module}.{alias.name}"
                    continue
                yield module
            else:
                yield node.module


@pytest.mark.parametrize("name", CORE)
def test_the_core_imports_nothing_from_the_floors_above(name):
    path = PACKAGE / f"{name}.py"
    assert path.exists(), f"core module {name} moved: update this test's list"
    upward = [m for m in imported_modules(path, top_level_only=False)
              if m.startswith(ABOVE_THE_CORE)]
    assert not upward, f"qlora_ref/{name}.py imports {upward} (a floor above the core)"


@pytest.mark.parametrize("name", CORE)
def test_the_core_does_not_import_torch_at_module_level(name):
    heavy = [m for m in imported_modules(PACKAGE / f"{name}.py", top_level_only=True)
             if m.split(".")[0] in ("torch", "bitsandbytes", "transformers", "peft")]
    assert not heavy, f"qlora_ref/{name}.py imports {heavy} when it is imported"


def test_the_core_list_is_complete():
    """Every top-level module is either in the core list or a known upper floor."""
    upper = {"__init__", "__main__", "cli", "bench"}
    top = {p.stem for p in PACKAGE.glob("*.py")}
    unknown = top - set(CORE) - upper
    assert not unknown, f"new top-level modules {sorted(unknown)}: add them to a floor here"
