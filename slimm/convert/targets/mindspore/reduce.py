"""Reductions and ArgMax / ArgMin for MindSpore (attributes normalised by the emitter)."""

from __future__ import annotations

from slimm.convert.targets.mindspore.registry import REGISTRY as R

REDUCE = {
    "ReduceMean": "ops.ReduceMean",
    "ReduceSum": "ops.ReduceSum",
    "ReduceMax": "ops.ReduceMax",
    "ReduceMin": "ops.ReduceMin",
    "ReduceProd": "ops.ReduceProd",
}


@R.register(*REDUCE, since=1)
def _reduce(e, node):  # () reduces every axis
    e.reduce(lambda x, axes, keep: f"{REDUCE[node.op]}({keep})({x}, {axes or ()!r})")


@R.register("ArgMax", "ArgMin", since=1)
def _argmax(e, node):
    fn = "ops.argmax" if node.op == "ArgMax" else "ops.argmin"
    e.arg_extreme(
        lambda x, axis, keep: f"ops.cast({fn}({x}, {axis}, {keep}), mindspore.int64)",
        lambda x, axis: f"ops.flip({x}, ({axis},))",
    )
