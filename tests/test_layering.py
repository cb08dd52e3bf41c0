"""The package's imports, read from the source (every import statement, those inside
functions too): no two modules import each other, directly or around a circle, and no
module imports one from a higher layer. The layers follow the design: kernels know only
torch and triton; the ops wrap them; models, heads and data use the ops; configuration,
checkpoints and metrics sit above them; the builders above those; the loop, evaluation,
benchmarks and checks above the builders; the CLI and the demo on top."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Layer of a module: the first matching prefix, longest first.
LAYERS = {
    "engine.kernels": 0, "engine.architectures": 0, "engine.ops": 1,
    "engine.models": 2, "engine.heads": 2, "engine.data": 2,
    "engine.config": 3, "engine.distributed": 3, "engine.checkpoint": 3, "engine.metrics": 3, "engine.plot": 3,
    "engine.builders": 4,
    "engine.train": 5, "engine.evaluate": 5, "engine.transfer_config": 5, "engine.bench": 5, "engine.selftest": 5,
    "engine.info": 5,
    "engine.demo": 6, "engine.cli": 6,
}


def modules() -> dict[str, Path]:
    """Every module of the package by its import name (kernels/ is installed as engine.kernels)."""
    found = {}
    for path in sorted((REPO / "engine").rglob("*.py")) + sorted((REPO / "kernels").glob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[0] == "kernels":
            parts = ["engine"] + parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules this one imports. `from pkg import mod` is an import of the module
    pkg.mod; a package's own __init__ running first is not a dependency of its modules."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    named = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            named.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    out = set()
    for target in named:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name and not name.startswith(target + "."):
            out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def layer(name: str) -> int:
    prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)
    if prefix is None:
        assert name == "engine", f"{name} has no layer in tests/test_layering.py's LAYERS"
        return 0
    return LAYERS[prefix]


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert circles(graph()) == []


def test_no_upward_imports():
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a, targets in graph().items() for b in sorted(targets) if layer(b) > layer(a)]
    assert upward == []


def test_the_reader_sees_real_imports():
    """The graph is not vacuous: known edges of the design are found."""
    edges = graph()
    assert "engine.ops.dispatch" in edges["engine.ops.bn_act"]
    assert "engine.kernels.bn_act" in edges["engine.ops.bn_act"]  # an import inside a function
    assert "engine.ops.check_child" not in edges["engine.ops.verify"]  # started by name, never imported
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
