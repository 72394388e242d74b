"""Shape-changing and indexing ops for Paddle. Targets, bounds and axes arrive folded (ints and
run-time sizes); Paddle's shape arguments take lists mixing ints and 0-d size tensors, which is
what a run-time size is under `paddle.jit.to_static`."""

from __future__ import annotations

import numpy as np

from slimm.convert.emitter import py_literal, slice_handler, split_handler
from slimm.convert.ir import Sym
from slimm.convert.targets.paddle.registry import REGISTRY as R

BIG = np.iinfo(np.int64).max // 2  # slice bounds beyond this mean "to the end"


def _list(e, dims) -> str:
    return "[" + ", ".join(e.sym(d) for d in dims) + "]"


@R.register("Reshape", since=5)
def _reshape(e, node):
    if node.attrs.get("allowzero", 0) and any(
        isinstance(t, int) and t == 0 for t in e.ints(node.inputs[1], "Reshape's target")
    ):
        raise e.error(
            "allowzero=1 with a 0 in the target shape is not supported (Paddle copies the input's size)"
        )
    e.out(f"paddle.reshape({e.t(node.inputs[0])}, {_list(e, e.reshape_target())})")


@R.register("Transpose", since=1)
def _transpose(e, node):
    perm = node.attrs.get("perm")
    if perm is None:
        perm = list(range(e.rank(node.inputs[0])))[::-1]
    e.out(f"paddle.transpose({e.t(node.inputs[0])}, {list(perm)!r})")


@R.register("Concat", since=4)
def _concat(e, node):
    parts = ", ".join(e.t(v) for v in node.inputs if v is not None)
    e.out(f"paddle.concat([{parts}], axis={node.attrs['axis']})")


@R.register("Squeeze", since=13)
def _squeeze(e, node):
    x = node.inputs[0]
    axes = e.ints(node.inputs[1], "Squeeze axes") if e.has(1) else None
    if not axes:
        known = e.known(x) if (x.is_static or x.shape is not None) else None
        if known is None or None in known:
            raise e.error("Squeeze without axes needs every input size known at conversion time")
        axes = [i for i, d in enumerate(known) if d == 1]
    e.out(f"paddle.squeeze({e.t(x)}, axis={list(axes)!r})")


@R.register("Unsqueeze", since=13)
def _unsqueeze(e, node):
    axes = e.ints(node.inputs[1], "Unsqueeze axes")
    rank = e.rank(node.inputs[0]) + len(axes)
    axes = sorted(a + rank if a < 0 else a for a in axes)  # inserted one by one, lowest first
    e.out(f"paddle.unsqueeze({e.t(node.inputs[0])}, {axes!r})")


R.register("Slice", since=13)(slice_handler)


@R.register("Split", since=18)
def _split(e, node):
    axis, sizes = e.split_sizes()
    if not any(isinstance(s, Sym) for s in sizes):
        e.outs(f"paddle.split({e.t(node.inputs[0])}, {[int(s) for s in sizes]!r}, axis={axis})")
    else:  # sizes known only at run time
        split_handler(e, node)


@R.register("Expand", since=8)
def _expand(e, node):
    x = node.inputs[0]
    shape = e.expand_shape()
    if shape is None:  # sizes that may be 1 on either side: let the run time decide
        e.out(f"_broadcast({e.t(x)}, {_list(e, e.ints(node.inputs[1], 'Expand target'))})")
    else:  # -1 keeps the input's size
        e.out(f"paddle.expand({e.t(x)}, {_list(e, [-1 if s is None else s for s in shape])})")


@R.register("Gather", since=13)
def _gather(e, node):
    x, idx = node.inputs
    rank = e.rank(x)
    axis = node.attrs.get("axis", 0)
    axis = axis + rank if axis < 0 else axis
    xc = e.t(x)
    if idx.is_static and idx.static.dtype != object:
        ind = idx.static.astype(np.int64)
        n = e.dims(x)[axis]
        if ind.ndim == 0:  # plain indexing; Python indexing takes negative indices as they are
            sel = [":"] * rank
            sel[axis] = str(int(ind))
            e.out(f"{xc}[{', '.join(sel)}]")
            return
        if not isinstance(n, Sym):
            ind = np.where(ind < 0, ind + n, ind)
            code = e.target.constant(ind)
        else:
            code = e.target.constant(ind)
            if (ind < 0).any():
                code = f"paddle.where({code} < 0, {code} + {xc}.shape[{axis}], {code})"
    else:
        code = e.t(idx)
        e.line(f"_i = paddle.where({code} < 0, {code} + {xc}.shape[{axis}], {code})")
        code = "_i"
    irank = e.rank(idx)
    if axis == 0 and rank == 2 and x.weight:  # a lookup table: one op, any index rank
        e.out(f"F.embedding({code}, {xc})")
    elif irank == 1:
        e.out(f"paddle.gather({xc}, {code}, axis={axis})")
    elif irank == 0:  # Paddle's gather wants a 1-D index
        e.out(f"paddle.gather({xc}, {code}.reshape([1]), axis={axis}).squeeze({axis})")
    else:
        xd, id_ = e.dims(x), e.dims(idx)
        shape = xd[:axis] + id_ + xd[axis + 1 :]
        e.out(f"paddle.gather({xc}, {code}.reshape([-1]), axis={axis}).reshape({_list(e, shape)})")


@R.register("GatherND", since=13)
def _gather_nd(e, node):
    if node.attrs.get("batch_dims", 0):
        raise e.error("batch_dims > 0 is not supported")
    x, idx = (e.t(v) for v in node.inputs)
    e.out(f"paddle.gather_nd({x}, {idx})")  # negative indices count from the end, as in ONNX


@R.register("ScatterND", since=16)
def _scatter_nd(e, node):
    x, idx, upd = node.inputs
    red = node.attrs.get("reduction", "none")
    if red not in ("none", "add"):
        raise e.error(f"reduction {red!r} is not supported")
    # x[idx[..., 0], ..., idx[..., k-1]] = / += updates. index_put also takes zero updates, which
    # scatter_nd_add rejects (a decode step has no visual tokens). Unbinding needs k, the index's last
    # size, when traced (Paddle aborts otherwise): exports fix it (visual_pos unsqueezed)
    k = e.dims(idx)[-1]
    ind = f"tuple(paddle.unbind({e.t(idx)}, axis=-1))" if isinstance(k, int) else f"_index_tuple({e.t(idx)})"
    e.out(f"paddle.index_put({e.t(x)}, {ind}, {e.t(upd)}, accumulate={red == 'add'})")


@R.register("Range", since=11)
def _range(e, node):
    args, dtype = [], "int64"
    for v in node.inputs:
        if not v.is_static:
            raise e.error("Range bounds must be known at conversion time (run-time sizes are fine)")
        x = v.static.reshape(-1)[0]
        if v.static.dtype.kind == "f":
            dtype = v.static.dtype.name
            args.append(py_literal(float(x)))
        else:
            if v.static.dtype != object:
                dtype = v.static.dtype.name
            args.append(e.sym(x))
    e.out(f"paddle.arange({', '.join(args)}, dtype={dtype!r})")


@R.register("ConstantOfShape", since=9)
def _constant_of_shape(e, node):
    shape = e.ints(node.inputs[0], "ConstantOfShape's shape")
    value = np.asarray(node.attrs.get("value", np.zeros(1, np.float32))).reshape(-1)
    e.out(f"paddle.full({_list(e, shape)}, {py_literal(value[0].item())}, dtype={value.dtype.name!r})")


@R.register("Shape", since=15)
def _shape(e, node):  # only reached when the size could not be folded (unknown rank): keep it exact
    start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
    sl = f"[{start}:{'' if end is None else end}]" if (start, end) != (0, None) else ""
    e.out(f"paddle.shape({e.t(node.inputs[0])}).astype('int64'){sl}")


@R.register("Tile", since=13)
def _tile(e, node):
    reps = e.ints(node.inputs[1], "Tile repeats")
    e.out(f"paddle.tile({e.t(node.inputs[0])}, {_list(e, reps)})")


@R.register("Trilu", since=14)
def _trilu(e, node):
    k = e.ints(node.inputs[1], "Trilu k")[0] if e.has(1) else 0
    if isinstance(k, Sym):
        raise e.error("Trilu's k must be known at conversion time")
    fn = "paddle.triu" if node.attrs.get("upper", 1) else "paddle.tril"
    e.out(f"{fn}({e.t(node.inputs[0])}, diagonal={int(k)})")


@R.register("CumSum", since=14)
def _cumsum(e, node):
    axis = e.ints(node.inputs[1], "CumSum axis")[0]
    rank = e.rank(node.inputs[0])
    axis = int(axis) + rank if int(axis) < 0 else int(axis)
    x = e.t(node.inputs[0])
    src = f"paddle.flip({x}, axis=[{axis}])" if node.attrs.get("reverse", 0) else x
    e.line(f"_c = paddle.cumsum({src}, axis={axis}, dtype={x}.dtype)")  # Paddle sums int32 into int64
    if node.attrs.get("exclusive", 0):  # shifted by one: the same sums as ONNX, no subtraction
        first, head = [":"] * rank, [":"] * rank
        first[axis], head[axis] = ":1", ":-1"
        e.line(
            f"_c = paddle.concat([paddle.zeros_like(_c[{', '.join(first)}]), _c[{', '.join(head)}]], axis={axis})"
        )
    e.out(f"paddle.flip(_c, axis=[{axis}])" if node.attrs.get("reverse", 0) else "_c")
