"""One home per framework: `slimm.frameworks.<name>` owns its start-up (quirks, quiet logs), its
tensors to and from NumPy, and its version. FRAMEWORKS below is the one list everything else reads.

Every module here has the same names: `startup()` imports the framework and returns it (the only
place that does), `to_numpy(x)`, `from_numpy(array, device=None)`, `device_of(x)`.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from types import ModuleType
from typing import Any

import numpy as np

from slimm.errors import BackendUnavailable, InputError


@dataclass(frozen=True)
class Framework:
    name: str  # ours: the module slimm.frameworks.<name>, backend names, conversion targets
    module: str  # what `import` takes
    package: str  # what `pip install` takes
    title: str  # how messages spell it
    tensors: bool = True  # has a tensor type of its own (a slimm.wrappers wrapper hands it in and out)
    target: bool = False  # `slimm convert` writes an export as this framework's own artifacts


FRAMEWORKS: dict[str, Framework] = {
    f.name: f
    for f in (
        Framework("numpy", "numpy", "numpy", "NumPy"),
        Framework("torch", "torch", "torch", "PyTorch"),
        Framework("jax", "jax", "jax", "JAX", target=True),
        Framework("paddle", "paddle", "paddlepaddle", "PaddlePaddle", target=True),
        Framework("mindspore", "mindspore", "mindspore", "MindSpore", target=True),
        Framework("onnxruntime", "onnxruntime", "onnxruntime", "ONNX Runtime", tensors=False),
    )
}
TENSOR_FRAMEWORKS = tuple(n for n, f in FRAMEWORKS.items() if f.tensors)  # numpy torch jax paddle mindspore
TARGETS = tuple(n for n, f in FRAMEWORKS.items() if f.target)  # jax paddle mindspore


# the top-level module a tensor's type lives in -> its framework (jax.Array's type is in jaxlib)
_BY_TYPE_MODULE = {f.module: n for n, f in FRAMEWORKS.items() if f.tensors} | {"jaxlib": "jax"}


def get(name: str) -> ModuleType:
    """The module `slimm.frameworks.<name>` (cheap: it imports its framework only in `startup`)."""
    if name not in FRAMEWORKS:
        raise InputError(f"unknown framework {name!r}; one of {', '.join(FRAMEWORKS)}")
    return importlib.import_module(f"slimm.frameworks.{name}")


def startup(name: str) -> ModuleType:
    """Import framework `name` quietly with its start-up quirks handled; returns the framework's module."""
    return get(name).startup()


def installed(name: str) -> bool:
    """Whether the framework can be imported here (without importing it)."""
    return importlib.util.find_spec(FRAMEWORKS[name].module) is not None


def version(name: str) -> str:
    """The installed version of the framework's pip package (without importing it)."""
    fw = FRAMEWORKS[name]
    try:
        return _dist_version(fw.package)
    except PackageNotFoundError:
        raise BackendUnavailable(
            f"{fw.title} is not installed here; install it with `pip install {fw.package}`"
        ) from None


def require(name: str, who: str = "") -> ModuleType:
    """`import <framework>`, or BackendUnavailable naming the pip package (`who` says what needs it)."""
    fw = FRAMEWORKS[name]
    try:
        return importlib.import_module(fw.module)
    except ImportError as e:
        raise BackendUnavailable(
            f"{who + ' needs ' if who else ''}{fw.title} ({fw.module!r}), which is not importable here "
            f"({e}); install it with `pip install {fw.package}`"
        ) from e


def to_numpy(x: Any) -> np.ndarray:
    """A tensor of any framework (or anything array-like) as a NumPy array; imports nothing."""
    if isinstance(x, np.ndarray):
        return x
    name = _BY_TYPE_MODULE.get(type(x).__module__.partition(".")[0])
    return get(name).to_numpy(x) if name else np.asarray(x)
