"""Loading and running a saved Paddle part: Paddle Inference's predictor over the PIR program
(`<name>.json` + `<name>.pdiparams`), with the program checked against its weights file first.
Imports paddle and NumPy only (no code generator, no handlers)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from slimm.errors import CheckpointError, InputError
from slimm.outdir import plain_name


def load(out_dir: str | Path, name: str, threads: int | None = None, onednn: bool = False) -> Predictor:
    """A callable (*numpy inputs) -> [numpy outputs] over Paddle Inference's predictor."""
    return Predictor(Path(out_dir), name, threads=threads, onednn=onednn)


def load_layer(out_dir: str | Path, name: str):
    """The saved program through `paddle.jit.load` (a TranslatedLayer): a slower fallback."""
    import paddle

    program, params = _artifact_paths(Path(out_dir), name)
    read_program(program, params)
    try:
        if params.stat().st_size:
            layer = paddle.jit.load(str(Path(out_dir) / name))
        else:  # jit.load refuses an empty weights file, but takes a program with none beside it
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copyfile(program, Path(tmp) / program.name)
                layer = paddle.jit.load(str(Path(tmp) / name))
    except Exception as e:  # noqa: BLE001 - Paddle raises several types for a bad file
        raise CheckpointError(
            f"{program} with {params}: not a loadable Paddle program ({type(e).__name__}: {_first_line(e)})"
        ) from None
    layer.eval()

    def run(*inputs):
        with paddle.no_grad():
            outs = layer(*[paddle.to_tensor(np.asarray(a)) for a in inputs])
        outs = outs if isinstance(outs, list | tuple) else [outs]
        return [o.numpy() for o in outs]

    return run


def to_numpy(x) -> np.ndarray:
    return np.asarray(x)


PROGRAM_SUFFIXES = (".json", ".pdmodel")  # Paddle 3's PIR program; older Paddle wrote .pdmodel
PARAMS_SUFFIX = ".pdiparams"


def artifact_files(out_dir: Path, name: str) -> list[Path]:
    return [p for s in (*PROGRAM_SUFFIXES, PARAMS_SUFFIX) if (p := out_dir / f"{name}{s}").exists()]


def _artifact_paths(out_dir: Path, name: str) -> tuple[Path, Path]:
    """(program, params) of a saved part; CheckpointError naming what is missing."""
    name = plain_name(name, out_dir, "part name")
    if not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: directory not found")
    program = next((p for s in PROGRAM_SUFFIXES if (p := out_dir / f"{name}{s}").exists()), None)
    if program is None:
        raise CheckpointError(f"{out_dir / (name + PROGRAM_SUFFIXES[0])}: Paddle program not found")
    params = out_dir / f"{name}{PARAMS_SUFFIX}"
    if not params.exists():
        raise CheckpointError(f"{params}: Paddle weights file not found")
    return program, params


class Predictor:
    """One saved part run by `paddle.inference`: NumPy arrays in, NumPy arrays out."""

    def __init__(self, out_dir: Path, name: str, threads: int | None = None, onednn: bool = False) -> None:
        import paddle.inference as pi

        program, params = _artifact_paths(out_dir, name)
        feeds = read_program(program, params)
        # an empty weights file stands for a program without weights (Paddle then wants "")
        config = pi.Config(str(program), str(params) if params.stat().st_size else "")
        config.disable_glog_info()
        if onednn:
            config.enable_onednn()
        else:
            # oneDNN's per-op set-up costs more than it saves at these sizes (tiny decode step 4.3 ms
            # with it off, 8.1 ms on)
            config.disable_onednn()
        if threads:
            config.set_cpu_math_library_num_threads(threads)
        try:
            self.predictor = pi.create_predictor(config)
        except Exception as e:  # noqa: BLE001 - Paddle raises several types for a bad file
            raise CheckpointError(
                f"{program} with {params}: not a loadable Paddle program ({type(e).__name__}: {_first_line(e)})"
            ) from None
        self.name = name
        self.input_names = self.predictor.get_input_names()
        self.output_names = self.predictor.get_output_names()
        # (dtype, sizes with -1 for dynamic) per input, when the program says: Paddle runs a
        # wrong-rank input without complaint and names a wrong dtype only obscurely
        self.specs = [feeds.get(n) for n in self.input_names] if feeds else [None] * len(self.input_names)
        self._ins = [self.predictor.get_input_handle(n) for n in self.input_names]
        self._outs = [self.predictor.get_output_handle(n) for n in self.output_names]

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        if len(inputs) != len(self._ins):
            raise InputError(
                f"{self.name}: {len(inputs)} inputs given; the program takes {len(self._ins)} ({self.input_names})"
            )
        for h, a, spec, n in zip(self._ins, inputs, self.specs, self.input_names, strict=True):
            a = np.asarray(a)
            if not a.flags.c_contiguous:  # (np.ascontiguousarray would make a 0-d array 1-d)
                a = np.ascontiguousarray(a)
            if spec is not None and (
                a.dtype != spec[0]
                or a.ndim != len(spec[1])
                or any(d not in (-1, s) for d, s in zip(spec[1], a.shape, strict=True))
            ):
                want = ", ".join("?" if d == -1 else str(d) for d in spec[1])
                raise InputError(
                    f"{self.name}: input {n!r} is {a.dtype}{list(a.shape)}; the program takes {spec[0]}[{want}]"
                )
            h.reshape(a.shape)
            h.copy_from_cpu(a)
        self.predictor.run()
        return [h.copy_to_cpu() for h in self._outs]


# PIR's JSON names a tensor's element type "<n>.t_<type>"
ITEM_BYTES = {
    "f32": 4,
    "f16": 2,
    "bf16": 2,
    "f64": 8,
    "i64": 8,
    "i32": 4,
    "i16": 2,
    "i8": 1,
    "ui8": 1,
    "bool": 1,
}
HEADER_BYTES = 1024  # per tensor in .pdiparams: versions, LoD, the tensor description (about 30 bytes seen)


def read_program(program: Path, params: Path) -> dict[str, tuple[np.dtype, list[int]]] | None:
    """Check a saved PIR program (JSON) against its weights file and return its inputs: name ->
    (dtype, sizes with -1 for dynamic). Paddle reads a truncated weights file without complaint, so
    the file's size is compared with the weights the program declares. None for a .pdmodel, or a
    JSON layout this reader does not know (Paddle then checks what it can)."""
    if program.suffix != ".json":
        return None
    try:
        doc = json.loads(program.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{program}: not a Paddle program (not valid JSON: {e})") from None
    need, count, feeds = 0, 0, {}
    stack = [doc]
    try:
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                op = node.get("#")
                if op == "p":  # a parameter: its type is in the op's output
                    dtype, dims = node["O"]["TT"]["D"][0]["#"].split(".t_")[1], node["O"]["TT"]["D"][1]
                    need += ITEM_BYTES[dtype] * int(np.prod(dims, dtype=np.int64))
                    count += 1
                elif isinstance(op, str) and op.endswith(".data") and "A" in node:  # a feed
                    attrs = {a["N"]: a["AT"]["D"] for a in node["A"]}
                    feeds[attrs["name"]] = (np.dtype(attrs["dtype"]), [int(d) for d in attrs["shape"]])
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None  # a layout this reader does not know
    size = params.stat().st_size
    if not need <= size <= need + HEADER_BYTES * count:
        raise CheckpointError(
            f"{params}: {size} bytes, but the {count} weights {program.name} declares take {need} bytes "
            "(plus headers): truncated, or written for another program"
        )
    return feeds


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
