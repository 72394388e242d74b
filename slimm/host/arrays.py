"""NumPy views of what callers hand in: torch tensors (recognised without importing torch), lists."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


def is_torch_tensor(x: Any) -> bool:
    # only a caller that already imported torch can hand us a tensor, so never import it here
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def as_numpy(x: Any) -> np.ndarray:
    """A torch tensor (any device) or array-like as a NumPy array."""
    if is_torch_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)
