"""The library's import graph keeps DESIGN section 3's directions, and has no cycles.

Every `import` counts, including those inside functions (they are how heavy dependencies stay
lazy, but a lazy import is still a dependency). Edges go from a module to the
`megatron_lopd` modules it imports; the rules are on top-level parts (`store`, `training`, ...).
"""

import ast
import collections
from pathlib import Path

import megatron_lopd

ROOT = Path(megatron_lopd.__file__).parent
BASE = {"errors", "runtime", "config", "provenance"}
# part -> the parts it may import (the package root, `megatron_lopd` itself, only holds the version).
ALLOWED = {
    "errors": set(),
    "runtime": {"errors"},
    "config": {"errors"},
    "provenance": {"errors", "runtime"},
    "artifacts": BASE,
    "datasets": BASE,  # data files in their published layouts: no models, no engines
    "store": BASE,  # the store knows nothing of models or training
    "models": BASE,  # models know nothing of the store
    "generation": BASE | {"artifacts", "datasets", "store", "models"},
    "training": BASE | {"artifacts", "store", "models"},  # meets generation only through artifacts
    "evaluation": BASE | {"artifacts", "datasets", "generation", "models"},
    "pipeline": BASE | {"artifacts", "datasets", "store", "models", "generation", "training", "evaluation"},
    "demo": BASE | {"artifacts", "datasets", "store", "models", "generation", "training", "evaluation", "pipeline"},
    "cli": BASE | {"artifacts", "datasets", "store", "models", "generation", "training", "evaluation", "pipeline", "demo"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = collections.defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from pkg import module` depends on that module; `from module import name` on the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return {m: graph[m] for m in modules}


def part(module: str) -> str | None:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else None


def test_no_import_cycles():
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_follow_the_design_directions():
    graph = import_graph()
    assert set(filter(None, map(part, graph))) <= set(ALLOWED), "a new top-level part: add it to ALLOWED with its directions"
    wrong = sorted(
        f"{a} -> {b}" for a, targets in graph.items() for b in targets
        if part(a) and part(b) and part(a) != part(b) and part(b) not in ALLOWED[part(a)]
    )
    assert not wrong, "imports against DESIGN section 3's directions:\n" + "\n".join(wrong)
