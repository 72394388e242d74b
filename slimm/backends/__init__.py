"""Backends by name, imported lazily: `load_backend("paddle", path)` imports only Paddle."""

from __future__ import annotations

import importlib

from slimm.errors import BackendUnavailable, InputError

# name -> (module, class, the pip package that provides the framework)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "torch": ("slimm.backends.torch", "TorchBackend", "torch"),
}


def load_backend(name: str, path, **kwargs):
    """Load the model directory `path` with backend `name`; returns a `slimm.backends.base.Backend`."""
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    module, cls, package = BACKENDS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailable(
            f"backend {name!r} needs the {package!r} package, which is not importable here ({e})"
        ) from None
    return getattr(mod, cls).load(path, **kwargs)
