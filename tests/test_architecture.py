"""The shape of the code: no import circles (every import statement counted, function-level and
``if TYPE_CHECKING:`` ones too), and the torch-level engine free of Lightning."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: modules that must work with torch alone (and transformers where a model needs it)
TORCH_LEVEL = ("lightning_delta.core", "lightning_delta.engine", "lightning_delta.inits", "lightning_delta.targets",
               "lightning_delta.state", "lightning_delta.fingerprint", "lightning_delta.tensors",
               "lightning_delta.quantize", "lightning_delta.handle", "lightning_delta.methods")


def modules() -> dict[str, Path]:
    found = {}
    for package in ("lightning_delta", "benchmarks"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module ``name`` imports (internal ones by module name, external ones by top-level package)."""
    out = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            wanted = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            wanted = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for module in wanted:
            while module and module not in known and "." in module:
                module = module.rpartition(".")[0]
            if module and module != name:
                out.add(module)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert cycles(graph()) == []


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_torch_level_engine_imports_no_lightning():
    edges = graph()
    for start in [m for m in edges if m.startswith(TORCH_LEVEL)]:
        reached = reachable(edges, start)
        assert not {"lightning", "lightning_delta.callback"} & reached, (start, sorted(reached))


def test_every_library_file_says_its_job_first_and_stays_under_400_lines():
    for path in sorted((ROOT / "lightning_delta").rglob("*.py")):
        text = path.read_text()
        docstring = ast.get_docstring(ast.parse(text))
        assert text.startswith('"""') and docstring and docstring.splitlines()[0].strip(), path
        assert len(text.splitlines()) <= 400, (path, len(text.splitlines()))
