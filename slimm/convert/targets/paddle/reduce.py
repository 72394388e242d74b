"""Reductions and ArgMax / ArgMin for Paddle (attributes normalised by the emitter)."""

from __future__ import annotations

from slimm.convert.targets.paddle.registry import REGISTRY as R

REDUCE = {
    "ReduceMean": "paddle.mean",
    "ReduceSum": "paddle.sum",
    "ReduceMax": "paddle.max",
    "ReduceMin": "paddle.min",
    "ReduceProd": "paddle.prod",
}
KEEP_DTYPE = ("ReduceSum", "ReduceProd")  # Paddle sums int32 into int64; ONNX keeps the input type


@R.register(*REDUCE, since=1)
def _reduce(e, node):
    def write(x, axes, keep):
        axis = f"axis={list(axes)!r}, " if axes else ""
        dtype = f"dtype={x}.dtype, " if node.op in KEEP_DTYPE else ""
        return f"{REDUCE[node.op]}({x}, {axis}{dtype}keepdim={keep})"

    e.reduce(write)


@R.register("ArgMax", "ArgMin", since=1)
def _argmax(e, node):
    fn = "paddle.argmax" if node.op == "ArgMax" else "paddle.argmin"
    e.arg_extreme(
        lambda x, axis, keep: f"{fn}({x}, axis={axis}, keepdim={keep}, dtype='int64')",
        lambda x, axis: f"paddle.flip({x}, axis=[{axis}])",
    )
