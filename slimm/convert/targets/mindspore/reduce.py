"""Reductions and ArgMax / ArgMin for MindSpore."""

from __future__ import annotations

from slimm.convert.targets.mindspore.registry import REGISTRY as R

REDUCE = {"ReduceMean": "ops.ReduceMean", "ReduceSum": "ops.ReduceSum", "ReduceMax": "ops.ReduceMax",
          "ReduceMin": "ops.ReduceMin", "ReduceProd": "ops.ReduceProd"}  # fmt: skip


def _reduce(e, node, axes):
    keep = bool(node.attrs.get("keepdims", 1))
    x = e.t(node.inputs[0])
    if not axes and node.attrs.get("noop_with_empty_axes", 0):
        e.out(x)
        return
    axes = tuple(int(a) for a in axes) if axes else ()  # () reduces every axis
    e.out(f"{REDUCE[node.op]}({keep})({x}, {axes!r})")


@R.register(*REDUCE, since=1)
def _reduce_any_opset(e, node):  # axes as an attribute before opset 18 (ReduceSum 13), an input after
    _reduce(e, node, e.reduce_axes())


@R.register("ArgMax", "ArgMin", since=1)
def _argmax(e, node):
    fn = "ops.argmax" if node.op == "ArgMax" else "ops.argmin"
    axis, keep = node.attrs.get("axis", 0), bool(node.attrs.get("keepdims", 1))
    x = e.t(node.inputs[0])
    if node.attrs.get("select_last_index", 0):
        # first index of the flipped tensor = last index of the original
        e.line(f"_r = ops.cast({fn}(ops.flip({x}, ({axis},)), {axis}, {keep}), mindspore.int64)")
        e.out(f"({x}.shape[{axis}] - 1 - _r)")
    else:
        e.out(f"ops.cast({fn}({x}, {axis}, {keep}), mindspore.int64)")
