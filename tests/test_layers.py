"""The layers of docs/architecture.md, checked: a module imports only from its own layer or
below, and the packages form no import cycle. Function-local imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dmoe"

# higher imports lower, never the reverse (the map in docs/architecture.md)
LAYERS = {
    0: {"errors", "io", "paths", "__init__"},
    1: {"base", "config", "metrics", "llama_server", "gguf_file"},
    2: {"experts", "data"},
    3: {"lora_gguf"},
    4: {"engine", "route", "train", "moe", "export", "generate", "evals"},
    5: {"runtime"},
    6: {"serve", "mcp"},
    7: {"cluster", "webui"},
    8: {"cli", "demo"},
}
RANK = {unit: rank for rank, units in LAYERS.items() for unit in units}


def _unit(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dmoe":
            parts = node.module.split(".")
            out.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("dmoe.")}
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        graph.setdefault(_unit(path), set()).update(_imports(path) - {_unit(path)})
    return graph


def test_every_module_has_a_layer():
    assert set(_graph()) <= set(RANK), f"add new packages to LAYERS (and the map): {set(_graph()) - set(RANK)}"


def test_imports_point_down_the_layers():
    bad = [(u, d) for u, deps in _graph().items() for d in deps if RANK[d] > RANK[u]]
    assert not bad, f"upward imports (importer, imported): {bad}"


def test_no_import_cycles_between_packages():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(u: str, path: list[str]) -> None:
        state[u] = 1
        for d in graph.get(u, ()):
            assert state.get(d) != 1, f"import cycle: {' -> '.join(path + [d])}"
            if d not in state:
                visit(d, path + [d])
        state[u] = 2

    for u in graph:
        if u not in state:
            visit(u, [u])
