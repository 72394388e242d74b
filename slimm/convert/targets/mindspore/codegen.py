"""MindSpore code generation: `nn.Cell` classes (weights as Parameters, straight-line `construct`)
that compile in GRAPH_MODE / `jit` and export to MINDIR with dynamic dims.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from slimm.convert.emitter import Target, header, np_literal
from slimm.convert.ir import Program
from slimm.convert.targets.mindspore import elementwise, nn, reduce, tensor  # noqa: F401  (register the handlers)
from slimm.convert.targets.mindspore.registry import REGISTRY, ms_name
from slimm.convert.targets.mindspore.runtime import startup
from slimm.errors import CheckpointError
from slimm.outdir import umask

CELL = "Model"  # the generated class
_CONST_RE = re.compile(r"\bself\.(c_[0-9a-f]{12})\b")


class MindSporeTarget(Target):
    name = "mindspore"
    registry = REGISTRY

    def __init__(self) -> None:
        # Constants become Tensor attributes set in __init__: graph mode then sees ready tensors instead of
        # NumPy calls to interpret. Named by content; one target instance per conversion (emitter.generate).
        self._consts: dict[str, np.ndarray] = {}

    def dim(self, var: str, axis: int) -> str:
        # In graph mode `x.shape[i]` of a dynamic dim is a run-time scalar that reshape, slicing, arange,
        # fill and broadcast_to accept, and it survives MINDIR export with None dims.
        return f"{var}.shape[{axis}]"

    def weight(self, var: str) -> str:
        return f"self.{var}"

    def constant(self, arr: np.ndarray) -> str:
        arr = np.asarray(arr, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        key = hashlib.sha1(f"{arr.dtype.str}{arr.shape}".encode() + arr.tobytes()).hexdigest()[:12]
        self._consts[f"c_{key}"] = arr
        return f"self.c_{key}"

    def sizes_tensor(self, codes: list[str], shape: tuple) -> str:
        parts = ", ".join(f"ops.scalar_to_tensor({c}, mindspore.int64)" for c in codes)
        return f"ops.reshape(ops.stack(({parts},)), {tuple(shape)!r})"

    def module(self, prog: Program, body: list[str], dim_lines: list[str]) -> str:
        args = ", ".join(["self"] + [v.var for v in prog.inputs])
        outs = ", ".join(v.var for v in prog.outputs)
        used = sorted(set(_CONST_RE.findall("\n".join(body))))
        init = [
            f"self.{w} = Parameter(Tensor(weights[{w!r}]), name={w!r}, requires_grad=False)"
            for w in prog.weights
        ]
        init += [f"self.{c} = Tensor({np_literal(self._consts[c])})" for c in used]
        lines = [
            *header(prog),
            "",
            "import mindspore",
            "import numpy as np",
            "from mindspore import Parameter, Tensor, mint, nn, ops",
            "",
            "",
            f"class {CELL}(nn.Cell):",
            "    def __init__(self, weights):",
            "        super().__init__()",
        ]
        lines += ["        " + ln for ln in init]
        lines += ["", f"    def construct({args}):"]
        lines += ["        " + ln for ln in dim_lines + body]
        lines.append(f"        return ({outs},)")
        return "\n".join(lines) + "\n"

    def runner(self, module, weights):
        """`jit` (AST graph mode), not PyNative: the per-op tests then go through the same parser and
        compiler as `save`, so a handler that only works eagerly fails here. One compile per shape."""
        ms = startup()
        fn = ms.jit(getattr(module, CELL)(weights), fullgraph=True)

        def run(*inputs):
            return [o.asnumpy() for o in fn(*(ms.Tensor(np.asarray(x, order="C")) for x in inputs))]

        return run

    def save(
        self, module, weights: dict[str, np.ndarray], inputs: list[tuple], out_dir, name: str
    ) -> list[str]:
        """Export the generated cell to `<out_dir>/<name>.mindir`; `inputs` are (name, dtype, dims) with
        None for dynamic dims. Returns the written file names, relative to out_dir."""
        ms = startup()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        cell = getattr(module, CELL)(weights)
        cell.set_train(False)
        specs = [ms.Tensor(shape=list(dims), dtype=getattr(ms, ms_name(dtype))) for _, dtype, dims in inputs]
        before = set(_artifact_files(out_dir, name))
        for stale in before:
            _remove(out_dir / stale)
        ms.export(cell, *specs, file_name=str(out_dir / name), file_format="MINDIR")
        written = _artifact_files(out_dir, name)
        if not written:
            raise CheckpointError(f"{out_dir / name}.mindir: MindSpore export wrote no file")
        _usual_permissions(out_dir, written)
        return written


def _artifact_files(out_dir: Path, name: str) -> list[str]:
    """What MindSpore writes for one export: `<name>.mindir`, or for graphs over its size limit
    `<name>_graph.mindir` plus `<name>_variables/data_*`."""
    out = [p.name for p in (out_dir / f"{name}.mindir", out_dir / f"{name}_graph.mindir") if p.exists()]
    var_dir = out_dir / f"{name}_variables"
    if var_dir.is_dir():
        out += sorted(f"{var_dir.name}/{p.name}" for p in var_dir.iterdir())
    return out


def _usual_permissions(out_dir: Path, files: list[str]) -> None:
    """MindSpore writes its files owner-read-only (0400, and 0700 for the variables folder); a model
    directory is read by other users and copied around like any other: modes as the umask says."""
    mask = umask()
    for f in files:
        (out_dir / f).chmod(0o666 & ~mask)
        if "/" in f:
            (out_dir / f).parent.chmod(0o777 & ~mask)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    if path.parent.name.endswith("_variables") and path.parent.is_dir() and not any(path.parent.iterdir()):
        path.parent.rmdir()


TARGET = MindSporeTarget()
