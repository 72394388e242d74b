"""ONNX Runtime wrappers: run one ONNX model file in ONNX Runtime with the tensors of another framework
(NumPy, PyTorch, MindSpore, PaddlePaddle, JAX) going in and out, and save/load the wrapper as a small `.pkl`.
Sessions come from slimm.backends.onnx, tensor conversion and framework start-up from slimm.frameworks;
this module checks and feeds the inputs, and owns the `.pkl` format.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from slimm import frameworks
from slimm.errors import CheckpointError, InputError

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

# The .pkl format: a dict of plain types only, read back with an unpickler that refuses every class.
_PKL_FORMAT = "slimm.wrappers.ORTWrapper"
_PKL_VERSION = 1
_PKL_MAX_BYTES = 1 << 20  # a wrapper file is a few hundred bytes; anything large is not one of ours
_OPTION_KEYS = {"model_path", "providers", "device", "intra_op_num_threads", "graph_optimization_level"}


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
    """Runs one ONNX model in ONNX Runtime; NumPy arrays in and out (subclasses name their framework in
    `framework`, or override `to_numpy`, `from_numpy` and `input_device`). Call with inputs positionally
    in model order, by name, or both."""

    framework: ClassVar[str] = "numpy"  # a name in slimm.frameworks.FRAMEWORKS
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
        from slimm.backends.onnx import make_session

        _check_options(options)
        self._options = options
        self.model_path = Path(options["model_path"])
        self._fw = frameworks.get(self.framework)
        self._fw.startup()
        frameworks.require("onnxruntime", type(self).__name__)  # onnxruntime-gpu for CUDA
        session = make_session(
            self.model_path,
            device=options["device"],
            threads=options["intra_op_num_threads"],
            opt_level=options["graph_optimization_level"],
            providers=options["providers"],
        )
        self._session = session
        self._run = session.run
        self.inputs: tuple[InputSpec, ...] = tuple(_input_spec(i) for i in session.get_inputs())
        self.input_names: tuple[str, ...] = tuple(s.name for s in self.inputs)
        self.output_names: tuple[str, ...] = tuple(o.name for o in session.get_outputs())
        self._output_list = list(self.output_names)
        self._by_name = {s.name: s for s in self.inputs}
        self._single_output = len(self.output_names) == 1

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
        return self._fw.to_numpy(x)

    def from_numpy(self, array: np.ndarray, device: Any = None) -> Any:
        """One output as this wrapper's framework tensor, on `device` (None: the host/default)."""
        return self._fw.from_numpy(array, device)

    def input_device(self, x: Any) -> Any:
        """The accelerator device an input tensor lives on, or None for host memory: the outputs go
        to the device of the first input that has one."""
        return self._fw.device_of(x)

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
            if device is None:
                device = self.input_device(x)
        for name, x in kwargs.items():
            spec = self._by_name.get(name)
            if spec is None:
                raise InputError(
                    f"{self.model_path.name} has no input {name!r}; its inputs are {', '.join(self.input_names)}"
                )
            if name in feeds:
                raise InputError(f"{self.model_path.name}: input {name!r} given positionally and by name")
            feeds[name] = self._prepare(spec, x)
            if device is None:
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
        state = _check_state(_read_plain_pickle(path), source=str(path))
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


class MindSporeWrapper(ORTWrapper):
    """mindspore.Tensor in and out (building one starts MindSpore past its NumPy 2 start-up error)."""

    framework = "mindspore"


class PaddlePaddleWrapper(ORTWrapper):
    """paddle.Tensor in and out; outputs go to the GPU place of the first GPU input, else the CPU."""

    framework = "paddle"


class JAXWrapper(ORTWrapper):
    """jax.Array in and out, on the device of the first non-CPU input, else the default device.
    Outputs follow jax's dtype rules: without `jax_enable_x64`, int64/float64 come back 32-bit."""

    framework = "jax"


ORTWrapper._registry[_class_key(ORTWrapper)] = ORTWrapper
# framework name -> its wrapper, in slimm.frameworks' order
WRAPPERS: dict[str, type[ORTWrapper]] = {
    w.framework: w for w in (NumpyWrapper, TorchWrapper, JAXWrapper, PaddlePaddleWrapper, MindSporeWrapper)
}
assert tuple(WRAPPERS) == frameworks.TENSOR_FRAMEWORKS, "a framework with tensors has no wrapper"


# ---- helpers --------------------------------------------------------------------------------------------


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


def _check_options(o: dict[str, Any]) -> None:
    """Options are checked the same whether they come from a caller, a .pkl or pickle.loads."""
    from slimm.backends.onnx import check_session_options

    def bad(what: str) -> InputError:
        return InputError(f"ORTWrapper option {what}")

    if set(o) != _OPTION_KEYS:
        raise bad(f"keys {sorted(map(repr, o))} are not the expected ones {sorted(_OPTION_KEYS)}")
    if not isinstance(o["model_path"], str) or not os.path.isabs(o["model_path"]):
        raise bad(f"model_path must be an absolute path string, got {o['model_path']!r}")
    check_session_options(
        o["intra_op_num_threads"],
        o["graph_optimization_level"],
        o["device"],
        "ORTWrapper",
        ("intra_op_num_threads", "graph_optimization_level"),
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


def _read_plain_pickle(path: Path) -> Any:
    """The plain values in a .pkl: a damaged file is a CheckpointError naming it, whatever the pickle
    machine makes of the damage (a flipped byte can turn into an opcode that overflows, asks for
    memory it cannot have, or builds a value of the wrong type)."""
    data = path.read_bytes()
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} is not a saved ORTWrapper: {e}") from e
    except (Exception, RecursionError) as e:  # noqa: BLE001 - see the docstring
        raise CheckpointError(
            f"{path} is not a saved ORTWrapper (unreadable: {type(e).__name__}: {e})"
        ) from None


class _PlainUnpickler(pickle.Unpickler):
    """Reads dicts, lists, tuples, strings and numbers only: any class or function reference (the way a
    pickle runs code) is refused, so a tampered .pkl cannot do more than fail validation."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a wrapper file holds plain values only"
        )
