"""Shape-changing and indexing ops for MindSpore. Targets, bounds and axes arrive folded (ints and
run-time sizes), so every shape here is a tuple of Python ints and `x.shape[i]` scalars."""

from __future__ import annotations

import numpy as np

from slimm.convert.emitter import py_literal, slice_handler, split_handler
from slimm.convert.ir import ONNX_TO_NP, Sym
from slimm.convert.targets.mindspore.registry import REGISTRY as R
from slimm.convert.targets.mindspore.registry import ms_dtype


@R.register("Reshape", since=5)
def _reshape(e, node):
    e.out(f"ops.reshape({e.t(node.inputs[0])}, {e.shape_code(e.reshape_target())})")


@R.register("Transpose", since=1)
def _transpose(e, node):
    perm = node.attrs.get("perm")
    if perm is None:
        perm = list(reversed(range(e.rank(node.inputs[0]))))
    # mint.permute, not ops.transpose: MindSpore's CPU Transpose kernel keeps its output's memory to
    # the end of the graph (never reused; 4 GB over 64 transposes of 31 MB), mint.permute does not
    e.out(f"mint.permute({e.t(node.inputs[0])}, {tuple(perm)!r})")


@R.register("Concat", since=4)
def _concat(e, node):
    parts = "".join(e.t(v) + ", " for v in node.inputs if v is not None)
    e.out(f"ops.concat(({parts}), {node.attrs['axis']})")


@R.register("Squeeze", since=13)
def _squeeze(e, node):
    axes = e.ints(node.inputs[1], "Squeeze axes") if e.has(1) else None
    x = e.t(node.inputs[0])
    e.out(f"ops.squeeze({x}, {tuple(axes)!r})" if axes else f"ops.squeeze({x})")


@R.register("Unsqueeze", since=13)
def _unsqueeze(e, node):
    axes = e.ints(node.inputs[1], "Unsqueeze axes")
    rank = e.rank(node.inputs[0]) + len(axes)
    expr = e.t(node.inputs[0])
    for a in sorted(a + rank if a < 0 else a for a in axes):  # ascending: each axis is final
        expr = f"ops.expand_dims({expr}, {a})"
    e.out(expr)


R.register("Slice", since=13)(slice_handler)
R.register("Split", since=18)(split_handler)


@R.register("Expand", since=8)
def _expand(e, node):
    x = node.inputs[0]
    sizes = e.expand_sizes()
    if sizes is not None:
        e.out(f"ops.broadcast_to({e.t(x)}, {e.shape_code(sizes)})")
        return
    # two sizes only known at run time, either may be 1: element-wise broadcasting decides at run
    # time; `* 1` / `and True` keep every value bit-exact
    x_code = e.t(x)
    e.line(f"_one = ops.ones({e.shape_code(e.ints(node.inputs[1], 'Expand target'))}, {x_code}.dtype)")
    e.out(
        f"(ops.logical_and({x_code}, _one) if {x_code}.dtype == mindspore.bool_ else ops.mul({x_code}, _one))"
    )


def _fix_negative(e, idx: str, shape_of: str, k_code: str) -> str:
    """Indices into the first k axes with negatives wrapped (ONNX allows them; MindSpore kernels don't)."""
    e.line(f"_n = ops.dyn_shape({shape_of})[:{k_code}]")
    return f"ops.where({idx} < 0, {idx} + _n, {idx})"


@R.register("Gather", since=13)
def _gather(e, node):
    x, idx = node.inputs
    axis = node.attrs.get("axis", 0)
    rank = e.rank(x)
    axis = axis + rank if axis < 0 else axis
    n = e.dims(x)[axis]
    if idx.is_static and idx.static.dtype != object:
        ind = idx.static.astype(np.int64)
        if (ind < 0).any() and not isinstance(n, Sym):
            ind = np.where(ind < 0, ind + int(n), ind)
        code = e.target.constant(ind)
        if (ind < 0).any():  # only when the axis size is known only at run time
            code = f"ops.where({code} < 0, {code} + {e.sym(n)}, {code})"
    else:
        code = e.t(idx)
        code = f"ops.where({code} < 0, {code} + {e.sym(n)}, {code})"
    e.out(f"ops.gather({e.t(x)}, {code}, {axis})")


def _nd_indices(e, node) -> str:
    x, idx = node.inputs[0], node.inputs[1]
    k = idx.shape[-1] if idx.shape else None
    code = e.t(idx)
    if isinstance(k, int):
        dims = e.dims(x)[:k]
        n = (
            e.target.sizes_tensor([e.sym(d) for d in dims], (k,))
            if any(isinstance(d, Sym) for d in dims)
            else (e.target.constant(np.array(dims, np.int64)))
        )
        return f"ops.where({code} < 0, {code} + {n}, {code})"
    return _fix_negative(e, code, e.t(x), f"{code}.shape[-1]")


@R.register("GatherND", since=13)
def _gather_nd(e, node):
    if node.attrs.get("batch_dims", 0):
        raise e.error("batch_dims > 0 is not supported")
    e.out(f"ops.gather_nd({e.t(node.inputs[0])}, {_nd_indices(e, node)})")


@R.register("ScatterND", since=16)
def _scatter_nd(e, node):
    red = node.attrs.get("reduction", "none")
    fn = {
        "none": "ops.tensor_scatter_update",
        "add": "ops.tensor_scatter_add",
        "mul": "ops.tensor_scatter_mul",
        "max": "ops.tensor_scatter_max",
        "min": "ops.tensor_scatter_min",
    }.get(red)
    if fn is None:
        raise e.error(f"reduction {red!r} is not supported")
    e.out(f"{fn}({e.t(node.inputs[0])}, {_nd_indices(e, node)}, {e.t(node.inputs[2])})")


@R.register("Range", since=11)
def _range(e, node):
    if not all(v.is_static for v in node.inputs):
        raise e.error("Range bounds must be known at conversion time (run-time sizes are fine)")
    start, limit, delta = (v.static.reshape(-1)[0] for v in node.inputs)
    dtype = "int64" if node.inputs[0].static.dtype == object else node.inputs[0].static.dtype.name
    if not isinstance(delta, Sym) and delta == 0:
        raise e.error("Range with step 0")  # MindSpore's kernel aborts the process on it
    if dtype.startswith("float"):  # float bounds never hold run-time sizes (those are ints)
        args = [py_literal(float(x)) for x in (start, limit, delta)]
    else:
        args = [e.sym(x) for x in (start, limit, delta)]
    e.out(f"ops.arange({', '.join(args)}, dtype={ms_dtype(dtype)})")


@R.register("ConstantOfShape", since=9)
def _constant_of_shape(e, node):
    shape = e.ints(node.inputs[0], "ConstantOfShape's shape")
    value = np.asarray(node.attrs.get("value", np.zeros(1, np.float32))).reshape(-1)
    # a Python scalar: NumPy scalars are refused as op arguments once MindSpore runs on NumPy 2
    e.out(f"ops.fill({ms_dtype(value.dtype.name)}, {e.shape_code(shape)}, {py_literal(value[0].item())})")


@R.register("Shape", since=15)
def _shape(e, node):  # only reached when the size could not be folded (unknown rank): keep it exact
    start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
    expr = f"ops.dyn_shape({e.t(node.inputs[0])})"
    if start != 0 or end is not None:
        expr = f"{expr}[{start}:{'' if end is None else end}]"
    e.out(expr)


@R.register("Tile", since=13)
def _tile(e, node):
    reps = e.ints(node.inputs[1], "Tile repeats")
    e.out(f"ops.tile({e.t(node.inputs[0])}, {e.shape_code(reps)})")


@R.register("Trilu", since=14)
def _trilu(e, node):
    k = e.sym(e.ints(node.inputs[1], "Trilu k")[0]) if e.has(1) else "0"
    fn = "ops.triu" if node.attrs.get("upper", 1) else "ops.tril"
    e.out(f"{fn}({e.t(node.inputs[0])}, {k})")


@R.register("CumSum", since=14)
def _cumsum(e, node):
    axis = e.ints(node.inputs[1], "CumSum axis")[0]
    excl, rev = bool(node.attrs.get("exclusive", 0)), bool(node.attrs.get("reverse", 0))
    e.out(f"ops.CumSum({excl}, {rev})({e.t(node.inputs[0])}, {e.sym(axis)})")


__all__ = ["ONNX_TO_NP"]
