"""The import graph of the package: no cycles, and imports only run down the layers.

Every import counts — module level, inside functions, under ``TYPE_CHECKING`` — because a lazy import
that runs up the layers is still a dependency (it is how the old cycles hid). The layer table is the
one in docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("delta_megatron", "pipelines", "launchers")

# (layer, module prefixes): a module may import its own layer and the layers below, never above.
LAYERS = [
    (0, ["delta_megatron.utils", "delta_megatron.ops", "delta_megatron.batch", "delta_megatron.parallel",
         "delta_megatron.topology",
         "delta_megatron.credit_contract", "delta_megatron.tracking"]),
    (1, ["delta_megatron.algo", "delta_megatron.credit", "delta_megatron.reward", "delta_megatron.data"]),
    (2, ["delta_megatron.models", "delta_megatron.actor", "delta_megatron.rollout", "delta_megatron.checkpoint",
         "delta_megatron.eval"]),
    (3, ["delta_megatron.config", "delta_megatron.builders", "delta_megatron.trainer", "delta_megatron.dataflow",
         "delta_megatron.planner_model", "delta_megatron.lifecycle",
         "delta_megatron.memory_ledger"]),
    (4, ["delta_megatron.cli", "delta_megatron.cli_eval", "delta_megatron.cli_export", "delta_megatron.cli_config",
         "delta_megatron.cli_doctor", "delta_megatron.cli_study", "delta_megatron.cli_serve", "delta_megatron.cli_analyze",
         "delta_megatron.study", "delta_megatron.train",
         "delta_megatron.planner", "delta_megatron.viz", "pipelines", "launchers"]),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for root in ROOTS for p in (REPO / root).rglob("*.py")}


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module ``name`` refers to (``a.b.c`` may be attribute ``c`` of module ``a.b``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import sub`` depends on the submodule; ``from mod import name`` on the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for t in targets:
            hit = _resolve(t)
            if hit is not None and hit != module:
                found.add(hit)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def layer_of(module: str) -> int:
    if module == "delta_megatron":  # the package root (its __init__ imports nothing)
        return 0
    best = None
    for layer, prefixes in LAYERS:
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (layer, len(p))
    if best is None:
        raise AssertionError(f"{module} has no layer: add it to LAYERS (and docs/architecture.md)")
    return best[0]


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


def test_imports_run_down_the_layers():
    bad = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
           for m, targets in GRAPH.items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert not bad, "imports that run up the layers:\n" + "\n".join(bad)


def test_the_actor_knows_no_credit_method():
    bad = [f"{m} imports {t}" for m, targets in GRAPH.items() if m.startswith("delta_megatron.actor")
           for t in targets if t.startswith("delta_megatron.credit.") or t == "delta_megatron.credit"]
    assert not bad, "\n".join(bad)


def test_library_never_imports_tests_or_apps():
    for m, targets in GRAPH.items():
        if layer_of(m) < 4:
            assert not [t for t in targets if t.startswith(("pipelines", "launchers"))], m
    for m, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        assert "from tests" not in text and "import tests" not in text, f"{m} imports from tests/"


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles() == []


@pytest.mark.parametrize("graph, cyclic", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_the_cycle_finder_finds_cycles(monkeypatch, graph, cyclic):
    monkeypatch.setattr(__import__(__name__, fromlist=["GRAPH"]), "GRAPH", graph)
    assert _cycles() == cyclic
