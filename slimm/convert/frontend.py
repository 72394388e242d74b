"""The converter's front end: an ONNX part -> a straight-line program over runtime tensors.

Shape arithmetic (Shape, Gather on shapes, Concat of dims, Reshape/Expand targets, Slice and Range
bounds ...) is folded here, at conversion time, into Python ints and symbolic dims (`Sym`: code
that reads a dimension of a runtime tensor). What remains are runtime nodes, each dispatched to a
framework's handler through the registry. Framework arrays never carry shape arithmetic, which is
what breaks `jax.jit` / `jax.export` and static-graph Paddle / MindSpore.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slimm.convert.fold import fold_node
from slimm.convert.ir import (
    DIM_CALL,
    ONNX_TO_NP,
    ConversionError,
    FoldError,
    Node,
    Program,
    Sym,
    Value,
    safe_var,
)

WEIGHT_MIN_ELEMENTS = 64  # float constants at least this large are stored weights, smaller ones inlined


def attributes(node, opset: int) -> dict[str, Any]:
    """A node's attributes as Python values, each checked against the op's schema: a name the op
    does not define, or a value of another type (a string where an int belongs), is refused, so what
    handlers write into code is what ONNX says it is."""
    import onnx
    from onnx import helper, numpy_helper

    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        schema = None  # an unknown op: the registry names it
    out = {}
    for a in node.attribute:
        if schema is not None:
            want = schema.attributes.get(a.name)
            if want is None or int(want.type) != a.type:
                raise ConversionError(
                    f"node {node.name!r} ({node.op_type}): attribute {a.name!r} "
                    + (
                        "is not defined for this op"
                        if want is None
                        else f"has the wrong type (not {want.type.name})"
                    )
                )
        v = helper.get_attribute_value(a)
        if a.type == a.TENSOR:
            v = numpy_helper.to_array(v)
        elif isinstance(v, bytes):
            v = v.decode(errors="replace")
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [x.decode(errors="replace") for x in v]
        out[a.name] = v
    return out


def load_program(path: str | Path, name: str | None = None) -> Program:
    """Read an ONNX file (with its external data) and fold everything static."""
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    try:
        # shape inference serializes the model: weights stay outside it (parts over 2 GB)
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf and file errors of several kinds
        raise ConversionError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"{path}: ONNX shape inference failed ({e})") from None
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"{path}: cannot read its external weights ({type(e).__name__}: {e})") from None
    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise ConversionError(f"{path}: no default-domain opset import")
    for o in model.opset_import:
        if o.domain not in ("", "ai.onnx"):
            raise ConversionError(f"{path}: ops of domain {o.domain!r} are not supported")

    values: dict[str, Value] = {}
    shapes, names = {}, {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            names[vi.name] = tuple(d.dim_param if d.HasField("dim_param") else None for d in t.shape.dim)

    prog = Program(name or path.stem, opset, [], [], {}, [])
    taken = prog.taken
    init_names = {i.name for i in g.initializer}
    for inp in g.input:
        if inp.name in init_names:
            continue
        var = safe_var(inp.name, taken)
        t = inp.type.tensor_type
        dims = []
        for axis, d in enumerate(t.shape.dim):
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            else:
                dvar = f"d_{var[2:]}_{axis}"
                prog.dims[dvar] = (var, axis)
                dims.append(Sym(dvar))
        if t.elem_type not in ONNX_TO_NP:
            raise ConversionError(
                f"{path}: input {inp.name!r} has ONNX element type {t.elem_type}, not supported"
            )
        v = Value(
            inp.name, var=var, dtype=ONNX_TO_NP[t.elem_type], shape=tuple(dims), dim_names=names.get(inp.name)
        )
        values[inp.name] = v
        prog.inputs.append(v)
    for init in g.initializer:
        arr = numpy_helper.to_array(init)
        values[init.name] = _constant(init.name, arr, prog, taken)

    for node in g.node:
        ins = [values.get(n) if n else None for n in node.input]
        for n, v in zip(node.input, ins, strict=True):
            if n and v is None:
                raise ConversionError(
                    f"{path}: node {node.name or node.op_type} reads {n!r}, which nothing produces"
                )
        attrs = attributes(node, opset)
        if node.op_type == "Constant":
            arr = next(iter(attrs.values()))
            values[node.output[0]] = _constant(node.output[0], np.asarray(arr), prog, taken)
            continue
        outs = None
        if all(v is None or v.is_static for v in ins):
            try:
                outs = fold_node(node.op_type, ins, attrs, [shapes.get(o) for o in node.output])
            except FoldError:
                outs = None
        elif node.op_type == "Shape":
            outs = [fold_shape(ins[0], attrs)]
        if outs is not None:
            for o, arr in zip(node.output, outs, strict=True):
                values[o] = Value(o, static=np.asarray(arr) if not isinstance(arr, np.ndarray) else arr)
            continue
        out_vals = []
        for o in node.output:
            v = Value(o, var=safe_var(o, taken))
            if o in shapes and shapes[o] is not None:
                v.shape = tuple(shapes[o])
                v.dim_names = names[o]
            values[o] = v
            out_vals.append(v)
        prog.nodes.append(
            Node(node.op_type, node.name or f"{node.op_type}_{len(prog.nodes)}", ins, out_vals, attrs)
        )
    for out in g.output:
        v = values[out.name]
        if v.is_static:  # an output that folded away still has to come out as a tensor
            v = Value(out.name, var=safe_var(out.name, taken), static=v.static)
        prog.outputs.append(v)
    return prog


def _constant(name: str, arr: np.ndarray, prog: Program, taken: set[str]) -> Value:
    if arr.dtype.kind == "f" and arr.size >= WEIGHT_MIN_ELEMENTS:
        var = safe_var(name, taken)
        prog.weights[var] = arr
        return Value(name, var=var, dtype=str(arr.dtype), shape=arr.shape, weight=True)
    return Value(name, static=arr)


def fold_shape(x: Value, attrs: dict) -> np.ndarray:
    if x.shape is None:
        raise ConversionError(f"Shape of {x.name!r}: its rank is unknown at conversion time")
    dims = np.empty(len(x.shape), dtype=object)
    for axis, d in enumerate(x.shape):
        dims[axis] = Sym(f"{DIM_CALL}({x.var}, {axis})") if d is None else d
    start, end = attrs.get("start", 0), attrs.get("end", None)
    return dims[start:end]
