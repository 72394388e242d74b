"""PaddlePaddle: start-up (glog and Python warnings quiet, MindSpore's oneDNN loaded first), and
paddle.Tensor to and from NumPy (outputs follow a GPU input's place)."""

from __future__ import annotations

import ctypes
import importlib.util
import os
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
            if "paddle" not in sys.modules:
                preload_mindspore_onednn()
            # GLOG_minloglevel 2: Paddle's C++ warnings ("PIR not support input out tensor!!!!!" on
            # every jit.save) are read when libpaddle loads; "No ccache found" is a Python warning
            quiet.ignore_warnings("paddle")
            with quiet.environment(GLOG_minloglevel="2"):
                require("paddle")
            _started = True
        return require("paddle")  # already imported: a dictionary look-up


def preload_mindspore_onednn() -> None:
    """Both wheels ship a libdnnl.so.3 (oneDNN 3.10 threadpool build in MindSpore, 3.6 OpenMP build
    in Paddle) and the loader keeps whichever comes first: MindSpore's CPU plugin needs symbols only
    its own has, and Paddle runs on either. Loading MindSpore's copy (a library, not MindSpore)
    before Paddle lets both run in one process, whichever is imported first."""
    spec = importlib.util.find_spec("mindspore")
    if spec is None or not spec.submodule_search_locations:
        return
    lib = os.path.join(spec.submodule_search_locations[0], "lib", "libdnnl.so.3")
    if os.path.isfile(lib):
        ctypes.CDLL(lib)


def to_numpy(x: Any) -> np.ndarray:
    paddle = sys.modules.get("paddle")
    if paddle is not None and isinstance(x, paddle.Tensor):
        if x.dtype == paddle.bfloat16:  # .numpy() would hand back the raw bits as uint16
            x = x.astype("float32")
        return x.numpy()
    return np.asarray(x)


def from_numpy(array: np.ndarray, device: Any = None) -> Any:
    import paddle

    if device is None:
        return paddle.from_dlpack(array)  # zero-copy, a little cheaper than to_tensor
    return paddle.to_tensor(array, place=device)


def device_of(x: Any) -> Any:
    """The place of a paddle.Tensor off the CPU, None for the CPU (or anything that is not one)."""
    paddle = sys.modules.get("paddle")
    if paddle is not None and isinstance(x, paddle.Tensor) and not x.place.is_cpu_place():
        return x.place
    return None
