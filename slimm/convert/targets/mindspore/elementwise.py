"""Element-wise ops and casts for MindSpore."""

from __future__ import annotations

from slimm.convert.ir import ONNX_TO_NP, Sym
from slimm.convert.targets.mindspore.registry import REGISTRY as R
from slimm.convert.targets.mindspore.registry import ms_dtype

BINARY = {
    "Add": "ops.add",
    "Sub": "ops.sub",
    "Mul": "ops.mul",
    "Sum": "ops.add",
    "Mean": "ops.add",
    "Equal": "ops.equal",
    "Less": "ops.less",
    "LessOrEqual": "ops.less_equal",
    "Greater": "ops.greater",
    "GreaterOrEqual": "ops.greater_equal",
    "And": "ops.logical_and",
    "Or": "ops.logical_or",
    "Xor": "ops.logical_xor",
    "Max": "ops.maximum",
    "Min": "ops.minimum",
}
UNARY = {
    "Neg": "ops.neg",
    "Sqrt": "ops.sqrt",
    "Reciprocal": "ops.reciprocal",
    "Sin": "ops.sin",
    "Cos": "ops.cos",
    "Sigmoid": "ops.sigmoid",
    "Not": "ops.logical_not",
    "Exp": "ops.exp",
    "Log": "ops.log",
    "Tanh": "ops.tanh",
    "Abs": "ops.abs",
    "Erf": "ops.erf",
    "Relu": "ops.relu",
    "Floor": "ops.floor",
    "Ceil": "ops.ceil",
    "Identity": "",
}
FLOATS = ("float16", "float32", "float64", "bfloat16")


def operands(e, node, scalars: bool = True) -> list[str] | None:
    """The inputs of an element-wise node as code, each non-scalar one that the op would broadcast
    broadcast explicitly first. MindSpore's CPU kernels that broadcast by themselves keep a full-size
    temporary per node alive to the end of the graph (never reused): the vision tower at 576 patches
    held 6 GB of them, a long prompt's attention mask add would hold prompt^2 per layer. Scalars
    broadcast without that cost (`scalars=False`: those too). None where the shapes cannot be
    resolved here."""
    vals = list(node.inputs)
    shape = e.broadcast_dims(vals) if all(v.is_static or v.shape is not None for v in vals) else None
    if shape is None:
        return None
    out = []
    for v in vals:
        scalar = all(not isinstance(d, Sym) and int(d) == 1 for d in e.dims(v))
        if (scalars and scalar) or e.has_dims(v, shape):
            out.append(e.t(v))
        else:
            out.append(f"ops.broadcast_to({e.t(v)}, {e.broadcast_shape_code(shape)})")
    return out


def _binary(e, node):
    # Max / Min / Sum / Mean take any number of inputs
    e.out(e.nary(lambda x, y: f"{BINARY[node.op]}({x}, {y})", operands(e, node), mean=node.op == "Mean"))


def _unary(e, node):
    e.out(f"{UNARY[node.op]}({e.t(node.inputs[0])})")


R.register(*BINARY, since=1)(_binary)
R.register(*UNARY, since=1)(_unary)


@R.register("Pow", since=1)
def _pow(e, node):
    a, b = e.t(node.inputs[0]), e.t(node.inputs[1])
    exp = node.inputs[1]
    if exp.is_static and exp.static.size == 1 and float(exp.static.reshape(-1)[0]) == 2.0:
        e.out(f"ops.mul({a}, {a})")  # x**2 (RMSNorm's variance): exact, and one cheap kernel
        return
    e.out(f"ops.cast(ops.pow({a}, {b}), {a}.dtype)")  # ONNX: the result has the base's type


def _dtype_of(v) -> str | None:
    if v.is_static:
        return v.static.dtype.name if v.static.dtype != object else "int64"
    return v.dtype


@R.register("Div", since=1)
def _div(e, node):
    a, b = operands(e, node) or [e.t(v) for v in node.inputs]
    kind = _dtype_of(node.inputs[0]) or _dtype_of(node.inputs[1])
    trunc = f'ops.div({a}, {b}, rounding_mode="trunc")'  # integer Div truncates toward zero in ONNX
    if kind is None:  # an intermediate: its type is a compile-time constant of the graph
        e.out(f"(ops.div({a}, {b}) if ops.is_floating_point({a}) else {trunc})")
    else:
        e.out(f"ops.div({a}, {b})" if kind in FLOATS else trunc)


@R.register("Where", since=9)
def _where(e, node):
    args = operands(e, node, scalars=False)  # CPU Where keeps even a broadcast scalar's temporary
    if args is None:
        e.out(f"ops.where({', '.join(e.t(v) for v in node.inputs)})")
    else:
        e.out(f"ops.select({', '.join(args)})")


@R.register("Cast", since=6)
def _cast(e, node):
    e.out(f"ops.cast({e.t(node.inputs[0])}, {ms_dtype(ONNX_TO_NP[node.attrs['to']])})")


@R.register("Gelu", since=20)
def _gelu(e, node):
    approx = "tanh" if node.attrs.get("approximate", "none") == "tanh" else "none"
    e.out(f"ops.gelu({e.t(node.inputs[0])}, approximate={approx!r})")
