"""ONNX parts -> native JAX / PaddlePaddle / MindSpore modules.

graph.py folds shape arithmetic and lists the runtime nodes; registry.py dispatches each node by
(op type, opset) to a target's handler; codegen.py writes the module source; one package per
target (jax/, paddle/, mindspore/) holds its handlers (one module per op family) and its saving.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from slimm import frameworks
from slimm.convert.graph import ConversionError, Program, load_program

TARGETS = {  # name -> module that defines `TARGET` (a codegen.Target) and its registry
    "jax": "slimm.convert.jax",
    "paddle": "slimm.convert.paddle",
    "mindspore": "slimm.convert.mindspore",
}


def get_target(name: str):
    if name not in TARGETS:
        raise ConversionError(f"unknown conversion target {name!r}; one of {', '.join(TARGETS)}")
    frameworks.startup(name)  # start-up quirks and quiet logs, before the target imports it
    return importlib.import_module(TARGETS[name]).TARGET


def generate_source(
    onnx_path: str | Path, target: str, name: str | None = None, trace: bool = False
) -> tuple[str, Program]:
    """(module source, folded program) for one ONNX file."""
    from slimm.convert.codegen import generate

    prog = load_program(onnx_path, name)
    return generate(get_target(target), prog, trace), prog


def import_generated(path: str | Path, name: str | None = None) -> ModuleType:
    """Import a generated module from its file (no sys.path changes)."""
    path = Path(path)
    mod_name = name or f"slimm_generated_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # MindSpore's graph compiler looks functions up by module
    spec.loader.exec_module(module)
    return module
