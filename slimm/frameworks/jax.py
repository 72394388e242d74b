"""JAX: start-up (XLA's C++ logs and the platform-probe warnings silenced), jax.Array to and from
NumPy (outputs follow an accelerator input's device)."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np

from slimm.frameworks import quiet, require

_started = False


def startup() -> ModuleType:
    global _started
    with quiet.startup_lock:
        if not _started:
            # XLA reads its log level when the backend starts (the first jax.devices()), so that is
            # done inside the quiet scope too; "no GPU/TPU found, falling back to cpu" comes from here
            quiet.quiet_logger("jax._src.xla_bridge")
            with quiet.environment(TF_CPP_MIN_LOG_LEVEL="2"):
                require("jax").devices()
            quiet.ignore_warnings("jax")
            _started = True
        return require("jax")  # already imported: a dictionary look-up


def to_numpy(x: Any) -> np.ndarray:
    return np.asarray(x)  # zero-copy for CPU jax arrays; copies from accelerators


def from_numpy(array: np.ndarray, device: Any = None) -> Any:
    import jax

    if device is None:
        return jax.numpy.asarray(array)
    return jax.device_put(array, device)


def device_of(x: Any) -> Any:
    """The accelerator device of a jax.Array, None for the CPU (or anything that is not one)."""
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        (dev,) = x.devices()  # a sharded array would have several; a decode loop never makes one
        if dev.platform != "cpu":
            return dev
    return None
