"""ONNX parts -> native JAX / PaddlePaddle / MindSpore modules.

ir.py holds the program a target emits code for; frontend.py reads an ONNX file into it, with
fold.py evaluating shape arithmetic at conversion time; registry.py dispatches each node by (op
type, opset) to a target's handler; emitter.py writes the module source; driver.py converts an
export directory and validate.py checks it tensor by tensor. targets/<fw>/ holds each framework's
handlers and code style (`codegen`) apart from loading a saved artifact (`runtime`): a converted
directory loads without the code generator.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from slimm import frameworks
from slimm.convert.ir import ConversionError

TARGETS = frameworks.TARGETS


def _check(name: str) -> None:
    if name not in TARGETS:
        raise ConversionError(f"unknown conversion target {name!r}; one of {', '.join(TARGETS)}")


def get_target(name: str):
    """The code generator of a target (its `Target`, with every handler registered)."""
    _check(name)
    frameworks.startup(name)  # start-up quirks and quiet logs, before the target imports it
    return importlib.import_module(f"slimm.convert.targets.{name}.codegen").TARGET


def get_runtime(name: str) -> ModuleType:
    """The run-time side of a target: `load(out_dir, part_name, **options)` and `to_numpy(x)`."""
    _check(name)
    frameworks.startup(name)
    return importlib.import_module(f"slimm.convert.targets.{name}.runtime")


def converted_format(target: str) -> str:
    return f"slimm-{target}"


def framework_version(target: str) -> str:
    return frameworks.version(target)


def generate_source(onnx_path: str | Path, target: str, name: str | None = None, trace: bool = False):
    """(module source, folded program) for one ONNX file."""
    from slimm.convert.emitter import generate
    from slimm.convert.frontend import load_program

    tgt = get_target(target)
    prog = load_program(onnx_path, name)
    return generate(tgt, prog, trace), prog


def import_generated(path: str | Path, name: str | None = None) -> ModuleType:
    """Import a generated module from its file (no sys.path changes)."""
    path = Path(path)
    mod_name = name or f"slimm_generated_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # MindSpore's graph compiler looks functions up by module
    spec.loader.exec_module(module)
    return module
