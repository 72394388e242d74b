"""Element-wise ops and casts for Paddle."""

from __future__ import annotations

from slimm.convert.emitter import py_literal
from slimm.convert.ir import ONNX_TO_NP
from slimm.convert.targets.paddle.registry import REGISTRY as R

BINARY = {
    "Add": "paddle.add",
    "Sub": "paddle.subtract",
    "Mul": "paddle.multiply",
    "Sum": "paddle.add",
    "Mean": "paddle.add",
    "Equal": "paddle.equal",
    "Less": "paddle.less_than",
    "LessOrEqual": "paddle.less_equal",
    "Greater": "paddle.greater_than",
    "GreaterOrEqual": "paddle.greater_equal",
    "And": "paddle.logical_and",
    "Or": "paddle.logical_or",
    "Xor": "paddle.logical_xor",
    "Max": "paddle.maximum",
    "Min": "paddle.minimum",
}
UNARY = {
    "Neg": "paddle.neg",
    "Sqrt": "paddle.sqrt",
    "Reciprocal": "paddle.reciprocal",
    "Sin": "paddle.sin",
    "Cos": "paddle.cos",
    "Sigmoid": "F.sigmoid",
    "Not": "paddle.logical_not",
    "Exp": "paddle.exp",
    "Log": "paddle.log",
    "Tanh": "paddle.tanh",
    "Abs": "paddle.abs",
    "Erf": "paddle.erf",
    "Relu": "F.relu",
    "Floor": "paddle.floor",
    "Ceil": "paddle.ceil",
    "Identity": "",
}
# dtypes Paddle tensors can hold (it has no uint16/32/64; a NumPy uint16 array becomes bfloat16)
PADDLE_DTYPES = {
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
}


def _binary(e, node):  # Max / Min / Sum / Mean take any number of inputs
    e.out(e.nary(lambda x, y: f"{BINARY[node.op]}({x}, {y})", mean=node.op == "Mean"))


@R.register("Pow", since=1)
def _pow(e, node):  # ONNX: the result has the base's type
    a, b = e.t(node.inputs[0]), e.t(node.inputs[1])
    y = node.inputs[1]
    if y.is_static and y.static.size == 1 and y.static.dtype.kind == "f":
        e.out(
            f"paddle.pow({a}, {py_literal(float(y.static.reshape(-1)[0]))})"
        )  # a scalar exponent keeps x's type
    else:
        e.out(f"paddle.pow({a}, {b}).astype({a}.dtype)")


def _unary(e, node):
    e.out(f"{UNARY[node.op]}({e.t(node.inputs[0])})")


R.register(*BINARY, since=1)(_binary)
R.register(*UNARY, since=1)(_unary)


@R.register("Div", since=1)
def _div(e, node):
    # integer Div truncates toward zero in ONNX; the dtype is known only when the module runs
    e.out(f"_div({e.t(node.inputs[0])}, {e.t(node.inputs[1])})")


@R.register("Where", since=9)
def _where(e, node):
    c, a, b = (e.t(v) for v in node.inputs)
    shapes = [v.static.shape if v.is_static else v.shape for v in node.inputs]
    if all(s is not None and all(isinstance(d, int) for d in s) for s in shapes) and len(set(shapes)) == 1:
        e.out(f"paddle.where({c}, {a}, {b})")
    else:
        e.out(f"_where({c}, {a}, {b})")


@R.register("Cast", since=6)
def _cast(e, node):
    to = ONNX_TO_NP[node.attrs["to"]]
    if to not in PADDLE_DTYPES:
        raise e.error(f"Paddle has no {to} tensors")
    e.out(f"paddle.cast({e.t(node.inputs[0])}, {to!r})")


@R.register("Gelu", since=20)
def _gelu(e, node):
    approx = node.attrs.get("approximate", "none") == "tanh"
    e.out(f"F.gelu({e.t(node.inputs[0])}, approximate={approx})")
