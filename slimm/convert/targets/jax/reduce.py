"""Reductions and ArgMax for JAX."""

from __future__ import annotations

from slimm.convert.targets.jax.registry import REGISTRY as R

REDUCE = {"ReduceMean": "jnp.mean", "ReduceSum": "jnp.sum", "ReduceMax": "jnp.max", "ReduceMin": "jnp.min",
          "ReduceProd": "jnp.prod"}  # fmt: skip


def _reduce(e, node, axes):
    keep = bool(node.attrs.get("keepdims", 1))
    x = e.t(node.inputs[0])
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            e.out(x)
            return
        e.out(f"{REDUCE[node.op]}({x}, keepdims={keep})")
        return
    e.out(f"{REDUCE[node.op]}({x}, axis={tuple(int(a) for a in axes)!r}, keepdims={keep})")


@R.register(*REDUCE, since=1)
def _reduce_any_opset(e, node):  # axes as an attribute before opset 18 (ReduceSum 13), an input after
    _reduce(e, node, e.reduce_axes())


@R.register("ArgMax", "ArgMin", since=1)
def _argmax(e, node):
    fn = "jnp.argmax" if node.op == "ArgMax" else "jnp.argmin"
    axis, keep = node.attrs.get("axis", 0), bool(node.attrs.get("keepdims", 1))
    x = e.t(node.inputs[0])
    if node.attrs.get("select_last_index", 0):
        e.line(f"_r = jnp.flip({x}, axis={axis})")
        e.out(f"({x}.shape[{axis}] - 1 - {fn}(_r, axis={axis}, keepdims={keep})).astype(jnp.int64)")
    else:
        e.out(f"{fn}({x}, axis={axis}, keepdims={keep}).astype(jnp.int64)")
