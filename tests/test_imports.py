"""The package's imports: no import circle anywhere in slimm/, and every public name (the Python API,
the original SliMM import paths) importable from where its users import it."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import slimm


def slimm_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the installed slimm package."""
    root = Path(slimm.__file__).parent
    files = {}
    for f in root.rglob("*.py"):
        parts = ("slimm", *f.relative_to(root).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return files


def _statements(body: list[ast.stmt], deferred: bool):
    """The statements run when a module is imported (not inside functions, nor under `if TYPE_CHECKING`);
    with `deferred`, those inside functions too."""
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not deferred:
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _statements(node.orelse, deferred)
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(node, field, None)
            if isinstance(inner, list):
                yield from _statements(inner, deferred)


def import_graph(deferred: bool = False) -> dict[str, set[str]]:
    """slimm module -> the slimm modules importing it runs. A module's own parent packages are left
    out: Python imports them before the module whatever it says (`from slimm import frameworks` inside
    slimm.backends is an edge to slimm.frameworks only)."""
    files = slimm_modules()
    graph = {}
    for mod, f in files.items():
        pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        parents = {mod.rsplit(".", i)[0] for i in range(1, mod.count(".") + 1)}
        deps = set()
        for node in _statements(ast.parse(f.read_text()).body, deferred):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    p = alias.name.split(".")
                    deps |= {".".join(p[:i]) for i in range(1, len(p) + 1)}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: pkg.count(".") + 2 - node.level]
                    base = ".".join([*up, base] if base else up)
                p = base.split(".")
                deps |= {".".join(p[:i]) for i in range(1, len(p))}
                submodules = {f"{base}.{a.name}" for a in node.names} & files.keys()
                deps |= submodules
                if len(submodules) < len(node.names):  # a name defined in `base` itself
                    deps.add(base)
        graph[mod] = {d for d in deps if d in files and d != mod and d not in parents}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_imports_and_finds_circles():
    graph = import_graph()
    assert "slimm.model.slimm" in graph["slimm.backends.torch"]  # from slimm.model.slimm import ...
    assert "slimm.frameworks" in graph["slimm.backends.onnx"]  # from slimm import frameworks
    assert "slimm" not in graph["slimm.backends.onnx"]  # ... which is no edge to slimm itself
    assert "slimm.wrappers" not in graph["slimm.backends.onnx"]  # imported inside a function
    assert "slimm.wrappers" in import_graph(deferred=True)["slimm.backends.onnx"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}) == [["a", "b", "c"]]


def test_no_import_circle_in_slimm():
    """Importing any slimm module never needs a module that is still half-imported."""
    assert circles(import_graph()) == []


def test_model_and_backends_need_no_circle_even_through_deferred_imports():
    """backends/torch -> model/slimm -> model/weights and no way back (the model's own generate runs
    through slimm.model.runner, which takes the model by interface); the weights loader lives with
    the model."""
    graph = import_graph(deferred=True)
    inside = {m for m in graph if m.startswith(("slimm.model", "slimm.backends"))}
    assert circles({m: graph[m] & inside for m in inside}) == []
    assert "slimm.weights" not in graph


# (module, name): the Python API and the original SliMM import paths, as README.md shows them
PUBLIC = [
    ("slimm", "load"),
    ("slimm", "SliMMError"),
    ("slimm", "CheckpointError"),
    ("slimm", "InputError"),
    ("slimm", "BackendUnavailable"),
    ("slimm.errors", "SliMMError"),
    ("slimm.errors", "CheckpointError"),
    ("slimm.errors", "InputError"),
    ("slimm.errors", "BackendUnavailable"),
    ("slimm.wrappers", "NumpyWrapper"),
    ("slimm.wrappers", "TorchWrapper"),
    ("slimm.wrappers", "MindSporeWrapper"),
    ("slimm.wrappers", "PaddlePaddleWrapper"),
    ("slimm.wrappers", "JAXWrapper"),
    ("slimm.model.slimm", "SliMMForConditionalGeneration"),
    ("slimm.model.processor", "SliMMQwen2VLProcessor"),
    ("slimm.model.utils_vl", "process_vision_info"),
    ("slimm.export", "export_model"),
    ("slimm.convert.driver", "convert_export"),
]


@pytest.mark.parametrize("module, name", PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_public_name_imports(module, name):
    obj = getattr(importlib.import_module(module), name)
    assert callable(obj), f"{module}.{name} is {obj!r}"
    if name.endswith("Error") or name == "BackendUnavailable":
        assert issubclass(obj, slimm.SliMMError)
