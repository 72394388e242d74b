"""ONNX Runtime: start-up with its default logger at errors only (sessions are built in
slimm.backends.onnx). It has no tensor type of its own: NumPy arrays go in and out."""

from __future__ import annotations

from types import ModuleType

from slimm.frameworks import quiet, require
from slimm.frameworks.numpy import device_of, from_numpy, to_numpy

__all__ = ["startup", "to_numpy", "from_numpy", "device_of"]

_started = False


def startup() -> ModuleType:
    global _started
    with quiet.startup_lock:
        ort = require("onnxruntime")
        if not _started:
            if not quiet.verbose():
                # 3 = errors: warnings such as "initializer ... not used" or a provider fallback are
                # about the graph, not something a user can act on
                ort.set_default_logger_severity(3)
            _started = True
        return ort
