"""Shape-changing and indexing ops for JAX. Targets, bounds and axes arrive folded (ints and
run-time sizes), so every shape here is a Python tuple, never an array."""

from __future__ import annotations

import numpy as np

from slimm.convert.emitter import py_literal, slice_handler, split_handler
from slimm.convert.ir import ONNX_TO_NP, Sym
from slimm.convert.targets.jax.registry import REGISTRY as R


@R.register("Reshape", since=5)
def _reshape(e, node):
    e.out(f"jnp.reshape({e.t(node.inputs[0])}, {e.shape_code(e.reshape_target())})")


@R.register("Transpose", since=1)
def _transpose(e, node):
    perm = node.attrs.get("perm")
    e.out(f"jnp.transpose({e.t(node.inputs[0])}, {tuple(perm) if perm is not None else None!r})")


@R.register("Concat", since=4)
def _concat(e, node):
    parts = ", ".join(e.t(v) for v in node.inputs if v is not None)
    e.out(f"jnp.concatenate([{parts}], axis={node.attrs['axis']})")


@R.register("Squeeze", since=13)
def _squeeze(e, node):
    axes = e.ints(node.inputs[1], "Squeeze axes") if e.has(1) else None
    e.out(f"jnp.squeeze({e.t(node.inputs[0])}, axis={tuple(axes) if axes else None!r})")


@R.register("Unsqueeze", since=13)
def _unsqueeze(e, node):
    axes = e.ints(node.inputs[1], "Unsqueeze axes")
    rank = e.rank(node.inputs[0]) + len(axes)
    axes = sorted(a + rank if a < 0 else a for a in axes)
    e.out(f"jnp.expand_dims({e.t(node.inputs[0])}, {tuple(axes)!r})")


R.register("Slice", since=13)(slice_handler)
R.register("Split", since=18)(split_handler)


@R.register("Expand", since=8)
def _expand(e, node):
    x = node.inputs[0]
    sizes = e.expand_sizes()
    if sizes is not None:
        e.out(f"jnp.broadcast_to({e.t(x)}, {e.shape_code(sizes)})")
        return
    # sizes that may be 1 on either side: let the run time decide
    target = e.shape_code(e.ints(node.inputs[1], "Expand's target shape"))
    e.out(f"(lambda _x: jnp.broadcast_to(_x, jnp.broadcast_shapes(_x.shape, {target})))({e.t(x)})")


@R.register("Gather", since=13)
def _gather(e, node):
    x, idx = node.inputs
    axis = node.attrs.get("axis", 0)
    if idx.is_static and idx.static.dtype != object:
        n = e.dims(x)[axis]
        ind = idx.static.astype(np.int64)
        if not isinstance(n, Sym):
            ind = np.where(ind < 0, ind + n, ind)
        code = e.target.constant(ind)
    else:
        code = e.t(idx)
        code = f"jnp.where({code} < 0, {code} + {e.t(x)}.shape[{axis}], {code})"
    e.out(f"jnp.take({e.t(x)}, {code}, axis={axis})")


@R.register("GatherND", since=13)
def _gather_nd(e, node):
    if node.attrs.get("batch_dims", 0):
        raise e.error("batch_dims > 0 is not supported")
    x, idx = (e.t(v) for v in node.inputs)
    e.out(f"{x}[tuple(jnp.moveaxis({idx}, -1, 0))]")


@R.register("ScatterND", since=16)
def _scatter_nd(e, node):
    x, idx, upd = (e.t(v) for v in node.inputs)
    red = node.attrs.get("reduction", "none")
    method = {"none": "set", "add": "add", "mul": "multiply", "max": "max", "min": "min"}.get(red)
    if method is None:
        raise e.error(f"reduction {red!r} is not supported")
    e.out(f"{x}.at[tuple(jnp.moveaxis({idx}, -1, 0))].{method}({upd})")


@R.register("Range", since=11)
def _range(e, node):
    args = []
    for v in node.inputs:
        if v.is_static:
            x = v.static.reshape(-1)[0]
            args.append(py_literal(float(x)) if np.asarray(v.static).dtype.kind == "f" else e.sym(x))
        else:
            raise e.error("Range bounds must be known at conversion time (run-time sizes are fine)")
    dtype = (
        node.outputs[0].dtype or np.asarray(node.inputs[0].static).dtype.name
    )  # Range keeps its inputs' type
    e.out(f"jnp.arange({', '.join(args)}, dtype=jnp.{dtype})")


@R.register("ConstantOfShape", since=9)
def _constant_of_shape(e, node):
    shape = e.ints(node.inputs[0], "ConstantOfShape's shape")
    value = node.attrs.get("value", np.zeros(1, np.float32))
    value = np.asarray(value).reshape(-1)
    e.out(f"jnp.full({e.shape_code(shape)}, {py_literal(value[0].item())}, dtype=jnp.{value.dtype.name})")


@R.register("Shape", since=15)
def _shape(e, node):  # only reached when the size could not be folded (unknown rank): keep it exact
    e.out(f"jnp.array({e.t(node.inputs[0])}.shape, dtype=jnp.int64)")


@R.register("Tile", since=13)
def _tile(e, node):
    reps = e.ints(node.inputs[1], "Tile repeats")
    e.out(f"jnp.tile({e.t(node.inputs[0])}, {e.shape_code(reps)})")


@R.register("Trilu", since=14)
def _trilu(e, node):
    k = e.sym(e.ints(node.inputs[1], "Trilu k")[0]) if e.has(1) else "0"
    fn = "jnp.triu" if node.attrs.get("upper", 1) else "jnp.tril"
    e.out(f"{fn}({e.t(node.inputs[0])}, k={k})")


@R.register("CumSum", since=14)
def _cumsum(e, node):
    axis = e.ints(node.inputs[1], "CumSum axis")[0]
    x = e.t(node.inputs[0])
    if node.attrs.get("reverse", 0):
        x = f"jnp.flip({x}, axis={axis})"
    expr = f"jnp.cumsum({x}, axis={axis}, dtype={e.t(node.inputs[0])}.dtype)"
    if node.attrs.get("exclusive", 0):
        expr = f"({expr} - {x})"
    if node.attrs.get("reverse", 0):
        expr = f"jnp.flip({expr}, axis={axis})"
    e.out(expr)


__all__ = ["ONNX_TO_NP"]
