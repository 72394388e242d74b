"""MindSpore: start-up (its NumPy-1 first-op error taken on purpose, glog quiet, the clash with
Paddle's oneDNN named), and mindspore.Tensor to and from NumPy."""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from types import ModuleType
from typing import Any

import numpy as np

from slimm.errors import BackendUnavailable
from slimm.frameworks import quiet

_numpy_checked = False


def startup(launch_blocking: bool = False) -> ModuleType:
    """Import MindSpore, take its one-time NumPy 2 start-up error on purpose, and return the module.

    Why: MindSpore 2.10 is compiled against the NumPy 1.x C API. The first op that parses an argument
    which might be a NumPy scalar (the shape tuple of `ops.reshape`, say) calls NumPy's `_import_array()`
    once, from a function-local static (`IsNumpyAvailable` in pynative/py_parse.cc). NumPy 2 refuses
    modules built for the 1.x ABI, so that import fails; MindSpore logs "Numpy init failed.", remembers
    the failure, but leaves the ImportError set, and that one op call raises
    `SystemError: ... returned a result with an exception set`. Later calls work, except that NumPy
    scalars and 0-d arrays are no longer accepted as op arguments (pass Python ints/floats or Tensors).
    NumPy 2 rejects the 1.x ABI by design and jax/jaxlib 0.10 require NumPy>=2, so the cause cannot be
    removed from outside: we trigger the failure here, check it is exactly that one, and check that the
    retry works.

    `launch_blocking=True` also makes eager (PyNative) ops synchronous: on CPU a small op read back
    with `.asnumpy()` took ~2.3 ms asynchronously and ~0.1 ms blocking here. MindSpore cannot turn it
    off again, so it is opt-in.
    """
    global _numpy_checked
    with quiet.startup_lock:
        # GLOG_v is MindSpore's C++ log level (3: errors), read when it loads; only for that long,
        # since Paddle reads the same name as a verbosity and would then print more
        with quiet.environment(GLOG_v="3"):
            ms = _import()
            if not _numpy_checked:
                take_numpy_init_failure(ms)
                _numpy_checked = True
        if launch_blocking:
            ms.runtime.launch_blocking()
        return ms


def _import() -> ModuleType:
    try:
        return importlib.import_module("mindspore")
    except ImportError as e:
        if "paddle" in sys.modules and "dnnl" in str(e):
            # see slimm.frameworks.paddle.preload_mindspore_onednn: Paddle was imported on its own
            # (not through slimm.frameworks.paddle.startup), so its libdnnl came first
            raise BackendUnavailable(
                "MindSpore cannot be imported after Paddle in one process: both ship libdnnl.so.3 and "
                f"Paddle's lacks symbols MindSpore needs ({e}); import mindspore (or call "
                "slimm.frameworks.startup('mindspore' or 'paddle')) before paddle"
            ) from e
        raise BackendUnavailable(
            f"MindSpore is not importable here ({e}); install it with `pip install mindspore`"
        ) from e


def take_numpy_init_failure(ms: ModuleType) -> None:
    def probe():
        return ms.ops.reshape(ms.Tensor(np.array([7], np.int64)), (1, 1))

    # NumPy writes a long "compiled using NumPy 1.x" banner to sys.stderr before raising; it is the
    # failure we expect, so keep it out of the user's terminal unless something else goes wrong.
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            probe()
        return  # NumPy 1.x, or the static was already settled by an earlier op
    except SystemError as e:
        cause = e.__cause__
        if not (isinstance(cause, ImportError) and "numpy" in str(cause).lower()):
            sys.stderr.write(captured.getvalue())
            raise
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    out = probe()  # must work now; if it does not, that error is real and propagates
    if tuple(out.shape) != (1, 1) or int(out.asnumpy()[0, 0]) != 7:
        raise BackendUnavailable(
            f"MindSpore start-up check failed: reshape gave {out.shape} {out.asnumpy()!r}, expected [[7]]"
        )


def to_numpy(x: Any) -> np.ndarray:
    ms = sys.modules.get("mindspore")
    if ms is not None and isinstance(x, ms.Tensor):
        if x.dtype == ms.bfloat16:  # asnumpy() refuses bfloat16 under this NumPy
            x = x.float()
        return x.asnumpy()
    return np.asarray(x)


def from_numpy(array: np.ndarray, device: Any = None) -> Any:
    import mindspore

    return mindspore.from_numpy(array)  # zero-copy; the array is ours alone


def device_of(x: Any) -> None:
    return None  # MindSpore places tensors itself (its context's device target)
