"""Backends by name, imported lazily: `load_backend("paddle", path)` imports only Paddle.

`X-ort` backends run the exported ONNX parts in ONNX Runtime through the wrapper that hands
framework X's tensors in and out (slimm.wrappers).
"""

from __future__ import annotations

import importlib

from slimm.errors import BackendUnavailable, InputError

# name -> (module, class, the pip package that provides the framework, fixed keyword arguments)
BACKENDS: dict[str, tuple[str, str, str, dict]] = {
    "torch": ("slimm.backends.torch", "TorchBackend", "torch", {}),
    "onnx": ("slimm.backends.onnx", "OnnxBackend", "onnxruntime", {}),
    "jax": ("slimm.backends.native", "JaxBackend", "jax", {}),
    "paddle": ("slimm.backends.native", "PaddleBackend", "paddlepaddle", {}),
    "mindspore": ("slimm.backends.native", "MindSporeBackend", "mindspore", {}),
    "torch-ort": ("slimm.backends.onnx", "OnnxBackend", "onnxruntime", {"wrapper": "torch"}),
    "jax-ort": ("slimm.backends.onnx", "OnnxBackend", "onnxruntime", {"wrapper": "jax"}),
    "paddle-ort": ("slimm.backends.onnx", "OnnxBackend", "onnxruntime", {"wrapper": "paddle"}),
    "mindspore-ort": ("slimm.backends.onnx", "OnnxBackend", "onnxruntime", {"wrapper": "mindspore"}),
}


def load_backend(name: str, path, **kwargs):
    """Load the model directory `path` with backend `name`; returns a `slimm.backends.base.Backend`."""
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    module, cls, package, fixed = BACKENDS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailable(
            f"backend {name!r} needs the {package!r} package, which is not importable here ({e})"
        ) from None
    return getattr(mod, cls).load(path, **fixed, **kwargs)
