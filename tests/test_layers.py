"""The house's layering, read from the code's own imports: the method knows no infrastructure, and each
layer imports only the layers below it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fip", "lab", "pipeline", "tuning", "cluster", "benchmarks", "fipcli")
INFRASTRUCTURE = ("ray", "mlflow", "webdataset", "boto3", "botocore", "moto")
# what each package may not import (ours or third-party)
FORBIDDEN = {
    "fip": {"lab", "pipeline", "tuning", "cluster", "benchmarks", "fipcli", *INFRASTRUCTURE},
    "lab": {"pipeline", "tuning", "cluster", "benchmarks", "fipcli", *INFRASTRUCTURE},
    "pipeline": {"tuning", "cluster", "benchmarks", "fipcli"},
    "tuning": {"cluster", "fipcli"},
    "cluster": {"fipcli"},
}


def imports_of(package: str) -> dict[str, set[str]]:
    """Top-level modules imported anywhere in `package` (lazy imports inside functions included), per file."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


def package_graph() -> dict[str, list[str]]:
    """Which of our packages each package imports: the house as arrows."""
    return {p: sorted({n for names in imports_of(p).values() for n in names if n in PACKAGES and n != p})
            for p in PACKAGES}


def test_each_layer_imports_only_what_is_below_it():
    bad = [f"{f} imports {sorted(names & FORBIDDEN[p])}" for p in FORBIDDEN
           for f, names in imports_of(p).items() if names & FORBIDDEN[p]]
    assert not bad, "\n".join(bad)


def test_the_graph_has_no_cycles():
    graph = package_graph()

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, (*seen, n))) for n in graph[a])

    assert not [p for p in graph if reaches(p, p)]


def module_name(path: Path) -> str:
    """``pipeline/shards.py`` -> ``pipeline.shards``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_graph(package: str) -> dict[str, set[str]]:
    """Which modules of `package` each of its modules imports, at module level or inside functions."""
    files = {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join([*up, *([base] if base else [])])
                targets |= {resolve(f"{base}.{a.name}") for a in node.names}  # a submodule, else the module
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of a module graph: its strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# circles inside a package that are known and not yet mended, each with why
KNOWN_CIRCLES: list[list[str]] = []


def test_no_package_has_an_import_circle_inside():
    found = [c for p in PACKAGES for c in circles(module_graph(p)) if c not in KNOWN_CIRCLES]
    assert not found, "import circles inside a package:\n" + "\n".join(" <-> ".join(c) for c in found)
