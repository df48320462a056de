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
