"""Backends by name, imported lazily: `load_backend("paddle", path)` imports only Paddle.

`X-ort` backends run the exported ONNX parts in ONNX Runtime through the wrapper that hands
framework X's tensors in and out (slimm.wrappers).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from slimm import frameworks
from slimm.errors import BackendUnavailable, InputError
from slimm.hub import resolve_model


@dataclass(frozen=True)
class BackendSpec:
    module: str
    cls: str
    framework: str  # the slimm.frameworks name whose package it needs to load at all
    options: dict = field(default_factory=dict)  # fixed keyword arguments of `cls.load`


BACKENDS: dict[str, BackendSpec] = {
    "torch": BackendSpec("slimm.backends.torch", "TorchBackend", "torch"),
    "onnx": BackendSpec("slimm.backends.onnx", "OnnxBackend", "onnxruntime"),
    **{
        t: BackendSpec("slimm.backends.native", "NativeBackend", t, {"target": t}) for t in frameworks.TARGETS
    },
    **{
        f"{fw}-ort": BackendSpec("slimm.backends.onnx", "OnnxBackend", "onnxruntime", {"wrapper": fw})
        for fw in ("torch", *frameworks.TARGETS)
    },
}


def load_backend(name: str, path, **kwargs):
    """Load the model directory (or Hugging Face hub id) `path` with backend `name`; returns a
    `slimm.backends.base.Backend`."""
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    path = resolve_model(path)
    spec = BACKENDS[name]
    try:
        mod = importlib.import_module(spec.module)
    except ImportError as e:
        package = frameworks.FRAMEWORKS[spec.framework].package
        raise BackendUnavailable(
            f"backend {name!r} needs the {package!r} package, which is not importable here ({e})"
        ) from None
    return getattr(mod, spec.cls).load(path, **spec.options, **kwargs)
