"""Paddle code generation: a `paddle.nn.Layer` per part, traced with dynamic dims and saved with
`paddle.jit.save` (Paddle 3's PIR program, `<name>.json` + `<name>.pdiparams`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from slimm.convert.emitter import Target, header, np_literal
from slimm.convert.ir import Program
from slimm.convert.targets.paddle import elementwise, nn, reduce, tensor  # noqa: F401  (register the handlers)
from slimm.convert.targets.paddle.registry import REGISTRY
from slimm.convert.targets.paddle.runtime import PARAMS_SUFFIX, artifact_files

# Functions a generated module defines only when its body calls them. Each works eagerly (sizes
# are ints) and under to_static (a dynamic size is a 0-d int64 Value, dtypes are known when traced).
HELPERS = {
    "_div": '''
def _div(a, b):
    """ONNX Div: integer division truncates toward zero (Paddle's `/` turns ints into floats)."""
    if a.dtype in (paddle.int64, paddle.int32, paddle.int16, paddle.int8):
        q = paddle.floor_divide(paddle.abs(a), paddle.abs(b))
        return paddle.where(paddle.logical_xor(a < 0, b < 0), -q, q)
    if a.dtype == paddle.uint8:
        return paddle.floor_divide(a, b)
    return paddle.divide(a, b)
''',
    "_sizes": '''
def _sizes(sizes, shape):
    """An int64 tensor of sizes, each a Python int or a 0-d run-time size."""
    parts = [paddle.full([1], s, dtype="int64") if isinstance(s, int) else s.astype("int64").reshape([1])
             for s in sizes]
    return paddle.concat(parts).reshape(shape)
''',
    "_where": '''
def _where(c, a, b):
    """ONNX Where, all three broadcast. Traced, paddle.where broadcasts only the sizes it can see
    (two dynamic sizes look equal), and broadcast_tensors wants one dtype: the condition goes as 0/1."""
    c, a, b = paddle.broadcast_tensors([paddle.cast(c, a.dtype), a, b])
    return paddle.where(paddle.cast(c, "bool"), a, b)
''',
    "_index_tuple": '''
def _index_tuple(index):
    """ScatterND's index (..., k) as k index tensors; tracing needs k fixed."""
    if not isinstance(index.shape[-1], int):
        raise ValueError("ScatterND: the index's last size must be fixed to trace (give it in the InputSpec)")
    return tuple(paddle.unbind(index, axis=-1))
''',
    "_distinct": '''
def _distinct(outputs, inputs):
    """Every output its own tensor: a saved program cannot return one of its inputs, or one tensor
    twice (an op that passes its input through, Identity, a no-op reduction)."""
    seen, out = list(inputs), []
    for o in outputs:
        if any(o is s for s in seen):
            o = paddle.assign(o)
        seen.append(o)
        out.append(o)
    return tuple(out)
''',
    "_broadcast": '''
def _broadcast(x, shape):
    """ONNX Expand: broadcast both ways (a 1 in `shape` keeps x's size), sizes known only at run time."""
    return paddle.broadcast_tensors([x, paddle.zeros(shape, dtype=x.dtype)])[0]
''',
}


class PaddleTarget(Target):
    name = "paddle"
    registry = REGISTRY

    def dim(self, var: str, axis: int) -> str:
        # an int eagerly; under to_static a 0-d int64 Value for a dynamic size, an int otherwise
        return f"{var}.shape[{axis}]"

    def weight(self, var: str) -> str:
        return f"self.{var}"

    def constant(self, arr: np.ndarray) -> str:
        return f"paddle.to_tensor({np_literal(arr)})"

    def sizes_tensor(self, codes: list[str], shape: tuple) -> str:
        return f"_sizes([{', '.join(codes)}], {list(shape)!r})"

    def module(self, prog: Program, body: list[str], dim_lines: list[str]) -> str:
        args = "".join(f", {v.var}" for v in prog.inputs)
        outs = "".join(f"{v.var}, " for v in prog.outputs)
        ins = "".join(f"{v.var}, " for v in prog.inputs)
        ret = f"return _distinct(({outs}), ({ins}))"
        text = "\n".join(body + [ret])
        head = "\n".join(
            [
                *header(prog),
                "",
                "import numpy as np",
                "import paddle",
                "import paddle.nn.functional as F",
                "",
                "WEIGHTS = {  # name -> (shape, dtype)",
                *(f"    {k!r}: ({tuple(v.shape)!r}, {str(v.dtype)!r})," for k, v in prog.weights.items()),
                "}",
            ]
        )
        helpers = [src.strip("\n") for name, src in HELPERS.items() if f"{name}(" in text]
        layer = [
            "class Model(paddle.nn.Layer):",
            "    def __init__(self, weights: dict[str, np.ndarray]) -> None:",
            "        super().__init__()",
            "        missing = sorted(set(WEIGHTS) - set(weights))",
            "        unexpected = sorted(set(weights) - set(WEIGHTS))",
            "        if missing or unexpected:",
            '            raise ValueError(f"weights missing: {missing}; unexpected: {unexpected}")',
            "        for name, (shape, dtype) in WEIGHTS.items():",
            "            w = np.asarray(weights[name])",
            "            if w.shape != shape or str(w.dtype) != dtype:",
            '                raise ValueError(f"weight {name}: {w.dtype}{list(w.shape)}, expected {dtype}{list(shape)}")',
            "            # persistable buffers are what paddle.jit.save writes to .pdiparams",
            "            self.register_buffer(name, paddle.to_tensor(w), persistable=True)",
            "",
            f"    def forward(self{args}):",
            *("        " + ln for ln in dim_lines + body),
            f"        {ret}",
        ]
        return "\n\n\n".join([head, *helpers, "\n".join(layer)]) + "\n"

    def runner(self, module, weights: dict[str, np.ndarray]):
        import paddle

        layer = module.Model(weights)
        layer.eval()

        def run(*inputs):
            with paddle.no_grad():
                outs = layer(*[paddle.to_tensor(np.asarray(a)) for a in inputs])
            return [o.numpy() for o in outs]

        return run

    # ---- deployable artifacts -----------------------------------------------------------------
    def save(
        self,
        module,
        weights: dict[str, np.ndarray],
        inputs: list[tuple[str, str, list]],
        out_dir: str | Path,
        name: str,
    ) -> list[str]:
        """Trace the generated Layer with dynamic input sizes (None dims) and write
        `<name>.json` (the PIR program) + `<name>.pdiparams` (weights) into out_dir; returns the
        names of the files written."""
        import paddle
        from paddle.static import InputSpec

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in artifact_files(out_dir, name):
            stale.unlink()
        layer = module.Model(weights)
        layer.eval()
        specs = [
            InputSpec([None if d is None else int(d) for d in dims], dtype, name=n)
            for n, dtype, dims in inputs
        ]
        with warnings.catch_warnings():  # tracing notes about `place` and weight-less programs
            warnings.filterwarnings("ignore", category=UserWarning, module="paddle")
            static = paddle.jit.to_static(layer, input_spec=specs, full_graph=True)
            paddle.jit.save(static, str(out_dir / name))
        params = out_dir / f"{name}{PARAMS_SUFFIX}"
        if not params.exists():  # no weights, and Paddle writes no file: an empty one keeps the pair
            params.touch()
        return [p.name for p in artifact_files(out_dir, name)]


TARGET = PaddleTarget()
