"""Reductions and ArgMax / ArgMin for JAX (attributes normalised by the emitter)."""

from __future__ import annotations

from slimm.convert.targets.jax.registry import REGISTRY as R

REDUCE = {
    "ReduceMean": "jnp.mean",
    "ReduceSum": "jnp.sum",
    "ReduceMax": "jnp.max",
    "ReduceMin": "jnp.min",
    "ReduceProd": "jnp.prod",
}


@R.register(*REDUCE, since=1)
def _reduce(e, node):
    e.reduce(lambda x, axes, keep: f"{REDUCE[node.op]}({x}, axis={axes!r}, keepdims={keep})")


@R.register("ArgMax", "ArgMin", since=1)
def _argmax(e, node):
    fn = "jnp.argmax" if node.op == "ArgMax" else "jnp.argmin"
    e.arg_extreme(
        lambda x, axis, keep: f"{fn}({x}, axis={axis}, keepdims={keep}).astype(jnp.int64)",
        lambda x, axis: f"jnp.flip({x}, axis={axis})",
    )
