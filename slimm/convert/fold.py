"""Conversion-time evaluation of static nodes, in NumPy, over ints and run-time sizes (`Sym`).

Arrays holding a `Sym` have dtype object. Numeric-only nodes fall back to ONNX's reference
evaluator; a node that would need to compare run-time sizes, or would make a large constant,
raises FoldError and stays a runtime node.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from slimm.convert.ir import ONNX_TO_NP, FoldError, Sym

MAX_FOLDED_ELEMENTS = 4096  # bigger results are computed at run time instead of stored
FOLDERS: dict[str, Callable] = {}


def folder(*ops: str):
    def deco(fn):
        for op in ops:
            if op in FOLDERS:
                raise ValueError(f"folder for {op} registered twice")
            FOLDERS[op] = fn
        return fn

    return deco


def _has_sym(a: np.ndarray) -> bool:
    return a.dtype == object and any(isinstance(x, Sym) for x in a.flat)


def _ints(a: np.ndarray) -> list[int]:
    return [int(x) for x in np.asarray(a).reshape(-1)]


def _axes(ins, attrs, idx: int = 1) -> list[int] | None:
    if len(ins) > idx and ins[idx] is not None:
        return _ints(ins[idx].static)
    return attrs.get("axes")


def _norm(axes, rank):
    return [a + rank if a < 0 else a for a in axes]


@folder("Identity")
def _identity(ins, attrs):
    return [ins[0].static]


@folder("Shape")
def _shape(ins, attrs):
    dims = np.array(ins[0].static.shape, dtype=np.int64)
    return [dims[attrs.get("start", 0) : attrs.get("end", None)]]


@folder("Gather")
def _gather(ins, attrs):
    return [np.take(ins[0].static, ins[1].static.astype(np.int64), axis=attrs.get("axis", 0))]


@folder("Concat")
def _concat(ins, attrs):
    arrs = [v.static for v in ins if v is not None]
    obj = any(a.dtype == object for a in arrs)
    return [np.concatenate([a.astype(object) if obj else a for a in arrs], axis=attrs.get("axis", 0))]


@folder("Unsqueeze")
def _unsqueeze(ins, attrs):
    x = ins[0].static
    axes = sorted(_norm(_axes(ins, attrs), x.ndim + len(_axes(ins, attrs))))
    for a in axes:
        x = np.expand_dims(x, a)
    return [x]


@folder("Squeeze")
def _squeeze(ins, attrs):
    x = ins[0].static
    axes = _axes(ins, attrs)
    return [np.squeeze(x, axis=tuple(_norm(axes, x.ndim))) if axes else np.squeeze(x)]


@folder("Reshape")
def _reshape(ins, attrs):
    x, shape = ins[0].static, _ints(ins[1].static)
    shape = [x.shape[i] if (s == 0 and not attrs.get("allowzero", 0)) else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


@folder("Slice")
def _slice(ins, attrs):
    x = ins[0].static
    starts, ends = _ints(ins[1].static), _ints(ins[2].static)
    axes = _ints(ins[3].static) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = _ints(ins[4].static) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    idx = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, _norm(axes, x.ndim), steps, strict=True):
        idx[a] = slice(s, e, st)  # Python slicing clamps like ONNX does
    return [x[tuple(idx)]]


@folder("Cast")
def _cast(ins, attrs):
    x = ins[0].static
    if _has_sym(x):
        if ONNX_TO_NP[attrs["to"]] not in ("int64", "int32"):
            raise FoldError("a run-time size cast to a non-integer type")
        return [x]
    return [x.astype(ONNX_TO_NP[attrs["to"]])]


def _binary(fn):
    def run(ins, attrs):
        a, b = ins[0].static, ins[1].static
        if _has_sym(a) or _has_sym(b):
            a, b = np.broadcast_arrays(a.astype(object), b.astype(object))
            return [
                np.array([fn(x, y) for x, y in zip(a.flat, b.flat, strict=True)], dtype=object).reshape(
                    a.shape
                )
            ]
        return None  # numeric: the reference evaluator does it with ONNX's exact semantics

    return run


def _int_div(x, y):
    if isinstance(x, Sym) or isinstance(y, Sym):
        return x // y  # sizes are non-negative: floor == truncation
    return int(np.trunc(x / y))


folder("Add")(_binary(lambda x, y: x + y))
folder("Sub")(_binary(lambda x, y: x - y))
folder("Mul")(_binary(lambda x, y: x * y))
folder("Div")(_binary(_int_div))


@folder("Neg")
def _neg(ins, attrs):
    x = ins[0].static
    return [np.array([-v for v in x.flat], dtype=object).reshape(x.shape)] if _has_sym(x) else None


@folder("Expand")
def _expand(ins, attrs):
    x, shape = ins[0].static, _ints(ins[1].static)
    return [np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(shape))).copy()]


@folder("Range")
def _range(ins, attrs):
    start, limit, delta = (ins[i].static for i in range(3))
    if any(_has_sym(a) for a in (start, limit, delta)):
        raise FoldError("Range with run-time bounds")
    return None


def fold_node(op: str, ins, attrs: dict, out_shapes) -> list[np.ndarray]:
    """Outputs of a node whose inputs are all static; FoldError if it must run at run time."""
    result = None
    if op in FOLDERS:
        result = FOLDERS[op](ins, attrs)
    if result is None:
        if any(v is not None and _has_sym(v.static) for v in ins):
            raise FoldError(f"{op} on run-time sizes")
        result = _reference(op, ins, attrs, len(out_shapes))
    for r in result:
        if np.asarray(r).size > MAX_FOLDED_ELEMENTS:
            raise FoldError(f"{op} would fold into a constant of {np.asarray(r).size} elements")
    return result


def _reference(op: str, ins, attrs, n_out: int) -> list[np.ndarray]:
    """One numeric node through onnx.reference (ONNX's own semantics, newest op version)."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    names = [f"i{k}" if v is not None else "" for k, v in enumerate(ins)]
    attrs = {k: numpy_helper.from_array(v) if isinstance(v, np.ndarray) else v for k, v in attrs.items()}
    node = helper.make_node(op, names, [f"o{k}" for k in range(n_out)], **attrs)
    try:
        ref = ReferenceEvaluator(node)
        feeds = {n: v.static for n, v in zip(names, ins, strict=True) if v is not None}
        return [np.asarray(x) for x in ref.run(None, feeds)]
    except (onnx.checker.ValidationError, RuntimeError, TypeError, ValueError, NotImplementedError) as e:
        raise FoldError(f"{op} not evaluable at conversion time ({e})") from None
