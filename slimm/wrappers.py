"""ONNX Runtime wrappers: run one ONNX model file in ONNX Runtime with the tensors of another framework
(NumPy, PyTorch, MindSpore, PaddlePaddle, JAX) going in and out, and save/load the wrapper as a small `.pkl`.
Each framework is imported only when its wrapper is made; `mindspore_startup` gets MindSpore past NumPy 2.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pickle
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from slimm.errors import BackendUnavailable, CheckpointError, InputError

# ONNX tensor element types as ONNX Runtime spells them -> the NumPy dtype it wants fed. Types NumPy
# cannot hold natively (bfloat16, float8, int4) are absent: such inputs are passed on uncast.
_ORT_DTYPES: dict[str, np.dtype] = {
    f"tensor({k})": np.dtype(v)
    for k, v in {
        "float": "float32",
        "double": "float64",
        "float16": "float16",
        "int8": "int8",
        "int16": "int16",
        "int32": "int32",
        "int64": "int64",
        "uint8": "uint8",
        "uint16": "uint16",
        "uint32": "uint32",
        "uint64": "uint64",
        "bool": "bool",
    }.items()
}

_OPT_LEVELS = ("disable", "basic", "extended", "layout", "all")
_DEVICES = ("auto", "cpu", "cuda")
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"

# The .pkl format: a dict of plain types only, read back with an unpickler that refuses every class.
_PKL_FORMAT = "slimm.wrappers.ORTWrapper"
_PKL_VERSION = 1
_PKL_MAX_BYTES = 1 << 20  # a wrapper file is a few hundred bytes; anything large is not one of ours


def _require(module: str, package: str, who: str) -> ModuleType:
    """Import `module` for wrapper `who`, or raise BackendUnavailable naming the pip package."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailable(
            f"{who} needs {module!r}, which is not importable here ({e}); install it with `pip install {package}`"
        ) from e


# ---- MindSpore start-up ---------------------------------------------------------------------------------

_mindspore_lock = threading.Lock()
_mindspore_numpy_checked = False


def mindspore_startup(launch_blocking: bool = False) -> ModuleType:
    """Import MindSpore, take its one-time NumPy 2 start-up error on purpose, and return the module.

    Why: MindSpore 2.10 is compiled against the NumPy 1.x C API. The first op that parses an argument
    which might be a NumPy scalar (the shape tuple of `ops.reshape`, say) calls NumPy's `_import_array()`
    once, from a function-local static (`IsNumpyAvailable` in pynative/py_parse.cc). NumPy 2 refuses
    modules built for the 1.x ABI, so that import fails; MindSpore logs "Numpy init failed.", remembers
    the failure, but leaves the ImportError set, and that one op call raises
    `SystemError: ... returned a result with an exception set`. Later calls work, except that NumPy
    scalars and 0-d arrays are no longer accepted as op arguments (pass Python ints/floats or Tensors).
    NumPy 2 rejects the 1.x ABI by design and jax/jaxlib 0.10 require NumPy>=2, so the cause cannot be removed from
    outside: we trigger the failure here, check it is exactly that one, and check that the retry works.

    `launch_blocking=True` also makes eager (PyNative) ops synchronous: on CPU a small op read back
    with `.asnumpy()` took ~2.3 ms asynchronously and ~0.1 ms blocking here. MindSpore cannot turn it
    off again, so it is opt-in; the wrappers themselves run no MindSpore ops and leave it off.
    """
    global _mindspore_numpy_checked
    try:
        ms = importlib.import_module("mindspore")
    except ImportError as e:
        if "paddle" in sys.modules and "dnnl" in str(e):
            # Both wheels ship a libdnnl.so.3 (oneDNN 3.10 threadpool build in MindSpore, 3.6 OpenMP
            # build in Paddle); the loader keeps whichever is loaded first, and MindSpore's plugin needs
            # symbols only its own has. Paddle works with MindSpore's, so MindSpore must come first.
            raise BackendUnavailable(
                "MindSpore cannot be imported after Paddle in one process: both ship libdnnl.so.3 and "
                f"Paddle's lacks symbols MindSpore needs ({e}); import mindspore (or call "
                "slimm.wrappers.mindspore_startup()) before paddle"
            ) from e
        raise BackendUnavailable(
            f"MindSpore is not importable here ({e}); install it with `pip install mindspore`"
        ) from e
    with _mindspore_lock:
        if not _mindspore_numpy_checked:
            _take_numpy_init_failure(ms)
            _mindspore_numpy_checked = True
        if launch_blocking:
            ms.runtime.launch_blocking()
    return ms


def _take_numpy_init_failure(ms: ModuleType) -> None:
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


# ---- the wrappers ---------------------------------------------------------------------------------------


def _class_key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One model input as ONNX Runtime declares it, cached so that a call does no session look-ups."""

    name: str
    type: str  # ONNX Runtime's spelling, e.g. "tensor(float)"
    dtype: np.dtype | None  # None: not a type NumPy holds; passed on uncast
    shape: tuple[int | str | None, ...] | None  # None: rank unknown
    fixed: tuple[tuple[int, int], ...]  # (axis, size) for every dimension the model fixes


def _castable(src: np.dtype, dst: np.dtype) -> bool:
    """Casts done silently: any width change within a kind, integers/bools to any number or bool.
    Float -> integer would truncate token ids or masks that went wrong upstream, so that is an error."""
    # ml_dtypes' bfloat16 (what np.asarray gives for a JAX bfloat16 array) is a float of kind "V".
    kind = "f" if src.name == "bfloat16" else src.kind
    if kind in "biu":
        return dst.kind in "biuf"
    if kind == "f":
        return dst.kind == "f"
    return False


class ORTWrapper:
    """Runs one ONNX model in ONNX Runtime; NumPy arrays in and out (subclasses change `to_numpy` and
    `from_numpy`). Call with inputs positionally in model order, by name, or both."""

    framework: ClassVar[str] = "numpy"
    # Set by subclasses that move outputs back to the device the inputs came from.
    _tracks_device: ClassVar[bool] = False
    _registry: ClassVar[dict[str, type[ORTWrapper]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        ORTWrapper._registry[_class_key(cls)] = cls

    def __init__(
        self,
        model_path: str | os.PathLike,
        providers: list[str | tuple[str, dict[str, Any]]] | None = None,
        device: str = "auto",
        intra_op_num_threads: int | None = None,
        graph_optimization_level: str = "all",
    ) -> None:
        self._setup(
            {
                "model_path": str(Path(model_path).expanduser().resolve()),
                "providers": _plain_providers(providers),
                "device": device,
                "intra_op_num_threads": intra_op_num_threads,
                "graph_optimization_level": graph_optimization_level,
            }
        )

    # ---- construction ---------------------------------------------------------------------------------
    def _setup(self, options: dict[str, Any]) -> None:
        _check_options(options)
        self._options = options
        self.model_path = Path(options["model_path"])
        self._import_framework()
        if not self.model_path.is_file():
            raise CheckpointError(f"ONNX model {self.model_path} does not exist")
        ort = _require("onnxruntime", "onnxruntime", type(self).__name__)  # onnxruntime-gpu for CUDA
        providers = _pick_providers(ort, options["providers"], options["device"])
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel,
            {
                "disable": "ORT_DISABLE_ALL",
                "basic": "ORT_ENABLE_BASIC",
                "extended": "ORT_ENABLE_EXTENDED",
                "layout": "ORT_ENABLE_LAYOUT",
                "all": "ORT_ENABLE_ALL",
            }[options["graph_optimization_level"]],
        )
        if options["intra_op_num_threads"] is not None:
            so.intra_op_num_threads = options["intra_op_num_threads"]
        try:
            session = ort.InferenceSession(str(self.model_path), sess_options=so, providers=providers)
        except Exception as e:
            # ONNX Runtime's own errors (bad protobuf, unsupported op...) do not always say which file;
            # anything else (MemoryError...) goes up unchanged.
            if type(e).__module__.startswith("onnxruntime"):
                raise CheckpointError(f"ONNX Runtime could not load {self.model_path}: {e}") from e
            raise
        if options["device"] == "cuda" and _CUDA not in session.get_providers():
            # ONNX Runtime falls back to CPU with only a warning when the CUDA libraries do not load.
            raise BackendUnavailable(
                f"device='cuda' was asked for {self.model_path.name}, but ONNX Runtime could not start "
                f"CUDAExecutionProvider here (session runs on {session.get_providers()})"
            )
        self._session = session
        self._run = session.run
        self.inputs: tuple[InputSpec, ...] = tuple(_input_spec(i) for i in session.get_inputs())
        self.input_names: tuple[str, ...] = tuple(s.name for s in self.inputs)
        self.output_names: tuple[str, ...] = tuple(o.name for o in session.get_outputs())
        self._output_list = list(self.output_names)
        self._by_name = {s.name: s for s in self.inputs}
        self._single_output = len(self.output_names) == 1

    def _import_framework(self) -> None:
        """Import this wrapper's framework (and keep what the conversions need on self)."""

    @property
    def providers(self) -> list[str]:
        """The execution providers the session really runs on, in priority order."""
        return self._session.get_providers()

    @property
    def session(self):
        """The `onnxruntime.InferenceSession` (for IO binding and other things this wrapper does not do)."""
        return self._session

    # ---- conversion hooks -----------------------------------------------------------------------------
    def to_numpy(self, x: Any) -> np.ndarray:
        """One input of this wrapper's framework (or anything array-like) as a NumPy array."""
        return np.asarray(x)

    def from_numpy(self, array: np.ndarray, device: Any = None) -> Any:
        """One output as this wrapper's framework tensor, on `device` (None: the host/default)."""
        return array

    def input_device(self, x: Any) -> Any:
        """The accelerator device an input tensor lives on, or None for host memory."""
        return None

    # ---- running --------------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model; one output is returned alone, several as a tuple in model order."""
        outputs, device = self._run_numpy(args, kwargs)
        if self._single_output:
            return self.from_numpy(outputs[0], device)
        return tuple(self.from_numpy(o, device) for o in outputs)

    def run_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Run the model; every output by name."""
        outputs, device = self._run_numpy(args, kwargs)
        return {n: self.from_numpy(o, device) for n, o in zip(self.output_names, outputs, strict=True)}

    def _run_numpy(self, args: tuple, kwargs: dict) -> tuple[list[np.ndarray], Any]:
        specs = self.inputs
        if len(args) > len(specs):
            raise InputError(
                f"{self.model_path.name} takes {len(specs)} inputs ({', '.join(self.input_names)}), "
                f"got {len(args)} positional"
            )
        feeds: dict[str, np.ndarray] = {}
        device = None
        for spec, x in zip(specs, args, strict=False):  # stops at the last positional one
            feeds[spec.name] = self._prepare(spec, x)
            if self._tracks_device and device is None:
                device = self.input_device(x)
        if kwargs:
            for name, x in kwargs.items():
                spec = self._by_name.get(name)
                if spec is None:
                    raise InputError(
                        f"{self.model_path.name} has no input {name!r}; its inputs are {', '.join(self.input_names)}"
                    )
                if name in feeds:
                    raise InputError(f"{self.model_path.name}: input {name!r} given positionally and by name")
                feeds[name] = self._prepare(spec, x)
                if self._tracks_device and device is None:
                    device = self.input_device(x)
        if len(feeds) != len(specs):
            missing = [s.name for s in specs if s.name not in feeds]
            raise InputError(
                f"{self.model_path.name} is missing input(s) {', '.join(missing)}; "
                f"its inputs are {', '.join(self.input_names)}"
            )
        try:
            outputs = self._run(self._output_list, feeds)
        except Exception as e:
            if type(e).__module__.startswith("onnxruntime"):
                e.add_note(f"while running {self.model_path}")
            raise
        return outputs, device

    def _prepare(self, spec: InputSpec, x: Any) -> np.ndarray:
        a = self.to_numpy(x)
        want = spec.dtype
        if want is not None and a.dtype != want:
            if not _castable(a.dtype, want):
                raise InputError(
                    f"{self.model_path.name}: input {spec.name!r} expects {want} ({spec.type}), got {a.dtype}, "
                    "which is not converted automatically"
                )
            a = a.astype(want)
        if spec.shape is not None:
            if a.ndim != len(spec.shape):
                raise InputError(
                    f"{self.model_path.name}: input {spec.name!r} expects rank {len(spec.shape)} "
                    f"{_shape_str(spec.shape)}, got rank {a.ndim} {tuple(a.shape)}"
                )
            for axis, size in spec.fixed:
                if a.shape[axis] != size:
                    raise InputError(
                        f"{self.model_path.name}: input {spec.name!r} expects shape {_shape_str(spec.shape)}, "
                        f"got {tuple(a.shape)}"
                    )
        return a

    # ---- saving ---------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # The session is never pickled: the model file is re-opened, so the state stays a few plain values.
        return {
            "format": _PKL_FORMAT,
            "version": _PKL_VERSION,
            "class": _class_key(type(self)),
            "options": dict(self._options),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._setup(_check_state(state, source="pickled state")["options"])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the wrapper to a `.pkl` (model path and options, never the session); returns the path."""
        path = Path(path)
        with open(path, "wb") as f:
            pickle.dump(self.__getstate__(), f, protocol=4)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ORTWrapper:
        """Re-create a wrapper written by `save`; returns the class it was saved from."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"wrapper file {path} does not exist")
        size = path.stat().st_size
        if size > _PKL_MAX_BYTES:
            raise CheckpointError(f"{path} is {size} bytes; a saved wrapper is a few hundred")
        data = path.read_bytes()
        try:
            state = _PlainUnpickler(io.BytesIO(data)).load()
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise CheckpointError(f"{path} is not a saved ORTWrapper: {e}") from e
        state = _check_state(state, source=str(path))
        target = ORTWrapper._registry.get(state["class"])
        if target is None:
            raise CheckpointError(
                f"{path} was saved from {state['class']}, which is not loaded here; import its module first"
            )
        if not issubclass(target, cls):
            raise CheckpointError(f"{path} holds a {target.__name__}, not a {cls.__name__}")
        model = Path(state["options"]["model_path"])
        if not model.is_file():
            raise CheckpointError(f"{path} refers to ONNX model {model}, which no longer exists")
        wrapper = target.__new__(target)
        wrapper._setup(state["options"])
        return wrapper

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.model_path)!r}, inputs={list(self.input_names)}, "
            f"outputs={list(self.output_names)}, providers={self.providers})"
        )


class NumpyWrapper(ORTWrapper):
    """NumPy arrays in and out (the base behaviour, under its framework's name)."""


class TorchWrapper(ORTWrapper):
    """torch.Tensor in and out; outputs go to the CUDA device of the first CUDA input, else the CPU."""

    framework = "torch"
    _tracks_device = True

    def _import_framework(self) -> None:
        self._torch = _require("torch", "torch", type(self).__name__)

    def to_numpy(self, x: Any) -> np.ndarray:
        torch = self._torch
        if isinstance(x, torch.Tensor):
            if x.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds every value exactly
                x = x.float()
            return x.numpy(force=True)  # detaches, copies off the GPU, resolves conj/neg views
        return np.asarray(x)

    def input_device(self, x: Any) -> Any:
        if isinstance(x, self._torch.Tensor) and x.device.type != "cpu":
            return x.device
        return None

    def from_numpy(self, array: np.ndarray, device: Any = None) -> Any:
        t = self._torch.from_numpy(array)  # shares the buffer ONNX Runtime just handed over
        return t if device is None else t.to(device)


class MindSporeWrapper(ORTWrapper):
    """mindspore.Tensor in and out."""

    framework = "mindspore"

    def _import_framework(self) -> None:
        # Through mindspore_startup so that code run after building a wrapper does not meet the
        # one-time NumPy error (the wrapper's own conversions never trigger it).
        self._ms = mindspore_startup()

    def to_numpy(self, x: Any) -> np.ndarray:
        ms = self._ms
        if isinstance(x, ms.Tensor):
            if x.dtype == ms.bfloat16:  # asnumpy() refuses bfloat16 under this NumPy
                x = x.float()
            return x.asnumpy()
        return np.asarray(x)

    def from_numpy(self, array: np.ndarray, device: Any = None) -> Any:
        return self._ms.from_numpy(array)  # zero-copy; the array is ours alone


class PaddlePaddleWrapper(ORTWrapper):
    """paddle.Tensor in and out; outputs go to the GPU place of the first GPU input, else the CPU."""

    framework = "paddle"
    _tracks_device = True

    def _import_framework(self) -> None:
        self._paddle = _require("paddle", "paddlepaddle", type(self).__name__)

    def to_numpy(self, x: Any) -> np.ndarray:
        paddle = self._paddle
        if isinstance(x, paddle.Tensor):
            if x.dtype == paddle.bfloat16:  # .numpy() would hand back the raw bits as uint16
                x = x.astype("float32")
            return x.numpy()
        return np.asarray(x)

    def input_device(self, x: Any) -> Any:
        if isinstance(x, self._paddle.Tensor) and not x.place.is_cpu_place():
            return x.place
        return None

    def from_numpy(self, array: np.ndarray, device: Any = None) -> Any:
        if device is None:
            return self._paddle.from_dlpack(array)  # zero-copy, a little cheaper than to_tensor
        return self._paddle.to_tensor(array, place=device)


class JAXWrapper(ORTWrapper):
    """jax.Array in and out, on the device of the first non-CPU input, else the default device.
    Outputs follow jax's dtype rules: without `jax_enable_x64`, int64/float64 come back 32-bit."""

    framework = "jax"
    _tracks_device = True

    def _import_framework(self) -> None:
        self._jax = _require("jax", "jax", type(self).__name__)
        self._jnp = importlib.import_module("jax.numpy")

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)  # zero-copy for CPU jax arrays; copies from accelerators

    def input_device(self, x: Any) -> Any:
        if isinstance(x, self._jax.Array):
            (dev,) = x.devices()  # a sharded array would have several; we never get one from a decode loop
            if dev.platform != "cpu":
                return dev
        return None

    def from_numpy(self, array: np.ndarray, device: Any = None) -> Any:
        if device is None:
            return self._jnp.asarray(array)
        return self._jax.device_put(array, device)


WRAPPERS: dict[str, type[ORTWrapper]] = {
    "numpy": NumpyWrapper,
    "torch": TorchWrapper,
    "mindspore": MindSporeWrapper,
    "paddle": PaddlePaddleWrapper,
    "jax": JAXWrapper,
}


# ---- helpers --------------------------------------------------------------------------------------------


ORTWrapper._registry[_class_key(ORTWrapper)] = ORTWrapper


def _input_spec(arg) -> InputSpec:
    # Sequence/map/optional inputs have no rank to check; ONNX Runtime checks them itself.
    shape = tuple(arg.shape) if arg.type.startswith("tensor(") and arg.shape is not None else None
    fixed = tuple((i, d) for i, d in enumerate(shape or ()) if isinstance(d, int) and d >= 0)
    return InputSpec(arg.name, arg.type, _ORT_DTYPES.get(arg.type), shape, fixed)


def _shape_str(shape: tuple) -> str:
    return (
        "(" + ", ".join("?" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
    )


def _plain_providers(providers) -> list | None:
    """Providers as plain lists/strings, so they pickle as plain data."""
    if providers is None:
        return None
    if isinstance(providers, str):
        providers = [providers]
    return [p if isinstance(p, str) else [p[0], dict(p[1])] for p in providers]


def _pick_providers(ort: ModuleType, providers: list | None, device: str) -> list:
    available = ort.get_available_providers()
    if providers is not None:
        unknown = [p if isinstance(p, str) else p[0] for p in providers]
        unknown = [p for p in unknown if p not in available]
        if unknown:
            # ONNX Runtime would only warn and fall back to CPU.
            raise BackendUnavailable(
                f"execution provider(s) {', '.join(unknown)} not available in this onnxruntime; "
                f"available: {', '.join(available)}"
            )
        return [p if isinstance(p, str) else (p[0], p[1]) for p in providers]
    if device == "cuda":
        if _CUDA not in available:
            raise BackendUnavailable(
                f"device='cuda' needs CUDAExecutionProvider, which this onnxruntime lacks "
                f"(available: {', '.join(available)}); install onnxruntime-gpu"
            )
        return [_CUDA, _CPU]
    if device == "auto" and _CUDA in available:
        return [_CUDA, _CPU]
    return [_CPU]


def _check_options(o: dict[str, Any]) -> None:
    """Options are checked the same whether they come from a caller, a .pkl or pickle.loads."""

    def bad(what: str) -> InputError:
        return InputError(f"ORTWrapper option {what}")

    if set(o) != {"model_path", "providers", "device", "intra_op_num_threads", "graph_optimization_level"}:
        raise bad(f"keys {sorted(o)} are not the expected ones")
    if not isinstance(o["model_path"], str) or not os.path.isabs(o["model_path"]):
        raise bad(f"model_path must be an absolute path string, got {o['model_path']!r}")
    if o["device"] not in _DEVICES:
        raise bad(f"device must be one of {', '.join(_DEVICES)}, got {o['device']!r}")
    if o["graph_optimization_level"] not in _OPT_LEVELS:
        raise bad(
            f"graph_optimization_level must be one of {', '.join(_OPT_LEVELS)}, got {o['graph_optimization_level']!r}"
        )
    n = o["intra_op_num_threads"]
    if n is not None and (type(n) is not int or n < 0):
        raise bad(
            f"intra_op_num_threads must be a non-negative int or None (0: ONNX Runtime decides), got {n!r}"
        )
    p = o["providers"]
    if p is not None:
        ok = isinstance(p, list) and all(
            isinstance(e, str)
            or (
                isinstance(e, list | tuple)
                and len(e) == 2
                and isinstance(e[0], str)
                and isinstance(e[1], dict)
                and all(
                    isinstance(k, str) and isinstance(v, str | int | float | bool) for k, v in e[1].items()
                )
            )
            for e in p
        )
        if not ok:
            raise bad(f"providers must be a list of names or (name, {{option: value}}) pairs, got {p!r}")
        if o["device"] != "auto":
            raise bad("providers and device were both given; give one")


def _check_state(state: Any, source: str) -> dict[str, Any]:
    if not (
        isinstance(state, dict)
        and set(state) == {"format", "version", "class", "options"}
        and state["format"] == _PKL_FORMAT
        and isinstance(state["class"], str)
        and isinstance(state["options"], dict)
    ):
        raise CheckpointError(f"{source} is not a saved ORTWrapper")
    if state["version"] != _PKL_VERSION:
        raise CheckpointError(
            f"{source} has wrapper format version {state['version']!r}; this code reads {_PKL_VERSION}"
        )
    try:
        _check_options(state["options"])
    except InputError as e:
        raise CheckpointError(f"{source}: {e}") from e
    return state


class _PlainUnpickler(pickle.Unpickler):
    """Reads dicts, lists, tuples, strings and numbers only: any class or function reference (the way a
    pickle runs code) is refused, so a tampered .pkl cannot do more than fail validation."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a wrapper file holds plain values only"
        )
