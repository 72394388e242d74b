"""Reductions and ArgMax for Paddle."""

from __future__ import annotations

from slimm.convert.targets.paddle.registry import REGISTRY as R

REDUCE = {"ReduceMean": "paddle.mean", "ReduceSum": "paddle.sum", "ReduceMax": "paddle.max",
          "ReduceMin": "paddle.min", "ReduceProd": "paddle.prod"}  # fmt: skip
KEEP_DTYPE = ("ReduceSum", "ReduceProd")  # Paddle sums int32 into int64; ONNX keeps the input type


def _reduce(e, node, axes):
    keep = bool(node.attrs.get("keepdims", 1))
    x = e.t(node.inputs[0])
    if not axes and node.attrs.get("noop_with_empty_axes", 0):
        e.out(x)
        return
    axis = f"axis={[int(a) for a in axes]!r}, " if axes else ""
    dtype = f"dtype={x}.dtype, " if node.op in KEEP_DTYPE else ""
    e.out(f"{REDUCE[node.op]}({x}, {axis}{dtype}keepdim={keep})")


@R.register(*REDUCE, since=1)
def _reduce_any_opset(e, node):  # axes as an attribute before opset 18 (ReduceSum 13), an input after
    _reduce(e, node, e.reduce_axes())


@R.register("ArgMax", "ArgMin", since=1)
def _argmax(e, node):
    fn = "paddle.argmax" if node.op == "ArgMax" else "paddle.argmin"
    axis, keep = node.attrs.get("axis", 0), bool(node.attrs.get("keepdims", 1))
    x = e.t(node.inputs[0])
    if node.attrs.get("select_last_index", 0):  # Paddle picks the first of equal values: search flipped
        e.line(f"_r = paddle.flip({x}, axis=[{axis}])")
        e.out(f"{x}.shape[{axis}] - 1 - {fn}(_r, axis={axis}, keepdim={keep}, dtype='int64')")
    else:
        e.out(f"{fn}({x}, axis={axis}, keepdim={keep}, dtype='int64')")
