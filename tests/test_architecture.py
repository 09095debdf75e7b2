"""The floors of the package, checked on its source: each floor imports only from the floors below.

core (NumPy: codebooks, blockwise, packing, double_quant, fourbit, quant_state,
validation, dtypes, backend, memory, _runtime) -> kernels (_kernels) -> torch
layer (nn, optim, interop; distributed, the FSDP2 sharding of that layer;
models, the real pretrained models the package converts) ->
training (train) -> the benchmark (bench) -> the command line (cli). A module may import
from its own floor and the floors below it, never above, and no modules import each
other, directly or round a ring; the NumPy core imports neither torch nor bitsandbytes at
module level. Every import statement counts, also those inside functions.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qlora_ref"
CORE = ["codebooks", "blockwise", "packing", "double_quant", "fourbit", "quant_state", "_runtime",
        "_atomic", "validation", "dtypes", "backend", "memory"]

#: floor -> the subpackages it must not import (the floors above it)
FORBIDDEN = {
    "core": ("qlora_ref.nn", "qlora_ref.optim", "qlora_ref.interop", "qlora_ref.distributed",
             "qlora_ref.models", "qlora_ref.train", "qlora_ref.bench", "qlora_ref.cli"),
    "nn": ("qlora_ref.distributed", "qlora_ref.train", "qlora_ref.bench", "qlora_ref.cli"),
    "distributed": ("qlora_ref.train", "qlora_ref.bench", "qlora_ref.cli"),
    "models": ("qlora_ref.train", "qlora_ref.bench", "qlora_ref.cli"),
    "optim": ("qlora_ref.train", "qlora_ref.bench", "qlora_ref.cli"),
    "interop": ("qlora_ref.train", "qlora_ref.bench", "qlora_ref.cli"),
    "train": ("qlora_ref.bench", "qlora_ref.cli"),
    "bench": ("qlora_ref.cli",),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_statements(path: Path, top_level_only: bool = False):
    """``(module, names)`` of each import statement in ``path``, relative imports resolved.

    ``import X`` gives ``("X", ())``; ``from X import a, b`` gives ``("X", ("a", "b"))``.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package if node.level == 1 else package.rsplit(".", node.level - 1)[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            yield module, tuple(alias.name for alias in node.names)


def imported_modules(path: Path, top_level_only: bool = False):
    """Absolute names of the modules ``path`` imports.

    ``from X import name`` yields ``X`` and ``X.name`` (``name`` may be a submodule).
    """
    for module, names in import_statements(path, top_level_only):
        yield module
        for name in names:
            yield f"{module}.{name}"


def core_files(name: str) -> list[Path]:
    """The files of a core module: ``name.py``, or every file of the package ``name/``."""
    folder = PACKAGE / name
    return sorted(folder.rglob("*.py")) if folder.is_dir() else [PACKAGE / f"{name}.py"]


def floor_files(floor: str) -> list[Path]:
    if floor == "core":
        return [p for name in CORE for p in core_files(name)]
    return sorted((PACKAGE / floor).rglob("*.py"))


@pytest.mark.parametrize("floor", list(FORBIDDEN))
def test_no_floor_imports_from_a_floor_above(floor):
    files = floor_files(floor)
    assert files, f"floor {floor} has no modules: update this test"
    upward = {f"qlora_ref/{p.relative_to(PACKAGE)}": sorted(
                  {m for m in imported_modules(p) if m.startswith(FORBIDDEN[floor])})
              for p in files}
    upward = {k: v for k, v in upward.items() if v}
    assert not upward, f"the {floor} floor reaches up: {upward}"


@pytest.mark.parametrize("name", CORE)
def test_the_core_does_not_import_torch_at_module_level(name):
    heavy = [m for p in core_files(name) for m in imported_modules(p, top_level_only=True)
             if m.split(".")[0] in ("torch", "bitsandbytes", "transformers", "peft")]
    assert not heavy, f"qlora_ref/{name} imports {heavy} when it is imported"


def test_the_command_line_imports_no_torch_at_module_level():
    """``qlora-ref --help`` stays fast: every command module (and the benchmark it imports)
    defers torch to its functions."""
    heavy = {str(p.relative_to(PACKAGE)): [m for m in imported_modules(p, top_level_only=True)
                      if m.split(".")[0] in ("torch", "bitsandbytes", "transformers", "peft")
                      or m.startswith(("qlora_ref.nn", "qlora_ref.train", "qlora_ref.optim"))]
             for p in floor_files("cli") + floor_files("bench")}
    assert not {k: v for k, v in heavy.items() if v}, heavy


def test_the_core_list_is_complete():
    """Every top-level module is in the core list or is the package's own entry point."""
    top = {p.stem for p in PACKAGE.glob("*.py")}
    unknown = top - set(CORE) - {"__init__", "__main__"}
    assert not unknown, f"new top-level modules {sorted(unknown)}: add them to a floor here"


def test_importing_the_package_or_the_command_line_imports_no_torch():
    code = ("import sys, qlora_ref, qlora_ref.cli\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def _module_files() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``qlora_ref`` modules it imports, at module level or inside a function.

    ``from PKG import name`` is an edge to ``PKG.name`` when that is a module
    (``from . import functional``), else to ``PKG``; the implicit import of a
    parent package is not an edge (the parent is already being imported).
    """
    files = _module_files()
    graph = {}
    for name, path in files.items():
        edges = set()
        for module, names in import_statements(path):
            if not names:
                edges.add(module)
            for alias in names:
                edges.add(f"{module}.{alias}" if f"{module}.{alias}" in files else module)
        graph[name] = {m for m in edges if m in files and m != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``a -> b -> ... -> a``) per strongly connected group of two or more modules."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm; the graph is a few hundred nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:  # a shortest way back to the group's first module
        start = min(group)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            for w in sorted(graph[path[-1]] & group):
                if w == start:
                    cycles.append(path + [start])
                    paths = []
                    break
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return sorted(cycles)


def test_no_import_cycles():
    """No two modules import each other, directly or round a ring, at any depth of the code.

    A function-level import breaks a cycle at run time but not for the
    reader: the two modules still need each other to be understood.
    """
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_ring():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
