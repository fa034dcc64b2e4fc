"""Dependencies point one way: the package's import graph has no cycles, and using a model does not need the trainer.

The graph is read from the source (every `import` of a neuraflux module, at the top of a file or inside a
function: a lazy import still makes two modules depend on each other), at two levels: modules, and the package's
first-level parts (`neuraflux.alignment`, `neuraflux.data`, `neuraflux.cli`, ...).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SRC = ROOT / "src" / "neuraflux"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imported(name: str) -> set[str]:
    """The neuraflux modules `name` imports anywhere in its source."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            # `from package import submodule` depends on the submodule
            out |= {f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    resolved = set()
    for target in out:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target.startswith("neuraflux") and target != name:
            resolved.add(target)
    return resolved


def graph(level: str) -> dict[str, set[str]]:
    node = (lambda m: ".".join(m.split(".")[:2])) if level == "package" else (lambda m: m)
    edges: dict[str, set[str]] = {}
    for name in MODULES:
        for target in imported(name):
            if node(target) != node(name):
                edges.setdefault(node(name), set()).add(node(target))
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(edges.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w) :] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        path.pop()
        state[v] = 2
        return None

    for v in sorted(edges):
        if v not in state and (cycle := visit(v)):
            return cycle
    return None


def test_the_graph_reader_sees_lazy_imports_and_cycles():
    # cli imports the server only inside a function; the reader must still see the edge
    assert "neuraflux.serve" in imported("neuraflux.cli")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


@pytest.mark.parametrize("level", ["module", "package"])
def test_the_import_graph_has_no_cycles(level):
    cycle = find_cycle(graph(level))
    assert cycle is None, " -> ".join(cycle)


def test_using_a_model_or_serving_one_imports_neither_lightning_nor_hydra():
    code = (
        "import sys\n"
        "import neuraflux.model, neuraflux.model.io, neuraflux.serve.app, neuraflux.rag, neuraflux.eval\n"
        "print(sorted(m for m in ('pytorch_lightning', 'lightning', 'hydra') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_config_tree_is_found_one_way_and_is_the_repositorys():
    from neuraflux.paths import CONF_DIR, conf_file

    assert CONF_DIR.resolve() == (ROOT / "conf").resolve()
    assert conf_file("constitution", "default.yaml").is_file()
    # no other module works out where conf/ is from its own location
    for name, path in MODULES.items():
        if name != "neuraflux.paths":
            assert "parents[" not in path.read_text(), name


def test_alignment_is_pure_maths_and_feedback_sits_above_it():
    # alignment: tensors in, tensors out; it may use the masking helpers and itself, nothing that loads, samples,
    # tokenizes or trains
    for name in MODULES:
        if name.startswith("neuraflux.alignment"):
            outside = {m for m in imported(name) if not m.startswith(("neuraflux.alignment", "neuraflux.masking"))}
            assert not outside, f"{name} imports {sorted(outside)}"
            assert "pytorch_lightning" not in MODULES[name].read_text(), name
    # the runtime side of RL (rollouts, reward sources, measurement) uses the maths, never the other way round
    assert "neuraflux.alignment" in graph("package")["neuraflux.feedback"]
