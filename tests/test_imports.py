"""The project's modules form layers: no import cycle among them, lazy imports (inside functions) included.

The imports are read from the source with ast, so an import that only runs on some path counts too.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_graph(folder: Path) -> dict[str, set[str]]:
    """module -> the modules of the same folder it imports anywhere in its source (top level or lazily)."""
    modules = {path.stem: path for path in folder.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        graph[name] = (imported & modules.keys()) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, colouring modules as it goes)."""
    state, stack = {}, []  # state: 1 on the current path, 2 done

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_project_has_no_import_cycle():
    graph = import_graph(ROOT)
    assert {"model", "selective_scan", "train", "main", "data", "config"} <= graph.keys()
    assert "selective_scan" in graph["model"] and "train" in graph["main"]  # the parser sees the imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_leaves_import_nothing_of_the_project():
    graph = import_graph(ROOT)
    for leaf in ("selective_scan", "ssd", "causal_conv", "config", "cli", "tasks", "sampling"):
        assert graph[leaf] == set(), (leaf, graph[leaf])


def test_a_lazy_import_that_closes_a_cycle_is_found(tmp_path):
    (tmp_path / "low.py").write_text("import os\n\ndef f():\n    from high import g  # lazy\n    return g\n")
    (tmp_path / "high.py").write_text("import low\n\ndef g():\n    return low\n")
    (tmp_path / "leaf.py").write_text("x = 1\n")
    graph = import_graph(tmp_path)
    assert graph == {"low": {"high"}, "high": {"low"}, "leaf": set()}
    assert find_cycle(graph) in (["high", "low", "high"], ["low", "high", "low"])
