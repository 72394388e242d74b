"""PyTorch: start-up, and torch.Tensor to and from NumPy (outputs follow a CUDA input's device)."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np

from slimm.frameworks import quiet, require


def startup() -> ModuleType:
    with quiet.startup_lock:
        return require("torch")


def to_numpy(x: Any) -> np.ndarray:
    torch = sys.modules.get("torch")  # a tensor exists only if torch is loaded: never import it here
    if torch is not None and isinstance(x, torch.Tensor):
        if x.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds every value exactly
            x = x.float()
        return x.numpy(force=True)  # detaches, copies off the GPU, resolves conj/neg views
    return np.asarray(x)


def from_numpy(array: np.ndarray, device: Any = None) -> Any:
    import torch

    t = torch.from_numpy(array)  # shares the buffer (ONNX Runtime hands over a fresh one)
    return t if device is None else t.to(device)


def device_of(x: Any) -> Any:
    """The CUDA device of a tensor, None for host memory (or anything that is not a tensor)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor) and x.device.type != "cpu":
        return x.device
    return None
