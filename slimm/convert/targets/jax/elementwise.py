"""Element-wise ops and casts for JAX."""

from __future__ import annotations

from slimm.convert.ir import ONNX_TO_NP
from slimm.convert.targets.jax.registry import REGISTRY as R

BINARY = {
    "Add": "jnp.add",
    "Sub": "jnp.subtract",
    "Mul": "jnp.multiply",
    "Sum": "jnp.add",
    "Mean": "jnp.add",
    "Equal": "jnp.equal",
    "Less": "jnp.less",
    "LessOrEqual": "jnp.less_equal",
    "Greater": "jnp.greater",
    "GreaterOrEqual": "jnp.greater_equal",
    "And": "jnp.logical_and",
    "Or": "jnp.logical_or",
    "Xor": "jnp.logical_xor",
    "Max": "jnp.maximum",
    "Min": "jnp.minimum",
}
UNARY = {
    "Neg": "jnp.negative",
    "Sqrt": "jnp.sqrt",
    "Reciprocal": "jnp.reciprocal",
    "Sin": "jnp.sin",
    "Cos": "jnp.cos",
    "Sigmoid": "jax.nn.sigmoid",
    "Not": "jnp.logical_not",
    "Exp": "jnp.exp",
    "Log": "jnp.log",
    "Tanh": "jnp.tanh",
    "Abs": "jnp.abs",
    "Erf": "jax.scipy.special.erf",
    "Relu": "jax.nn.relu",
    "Floor": "jnp.floor",
    "Ceil": "jnp.ceil",
    "Identity": "",
}


def _binary(e, node):  # Max / Min / Sum / Mean take any number of inputs
    e.out(e.nary(lambda x, y: f"{BINARY[node.op]}({x}, {y})", mean=node.op == "Mean"))


@R.register("Pow", since=1)
def _pow(e, node):
    a, b = e.t(node.inputs[0]), e.t(node.inputs[1])
    e.out(f"jnp.power({a}, {b}).astype({a}.dtype)")  # ONNX: the result has the base's type


def _unary(e, node):
    e.out(f"{UNARY[node.op]}({e.t(node.inputs[0])})")


R.register(*BINARY, since=1)(_binary)
R.register(*UNARY, since=1)(_unary)


@R.register("Div", since=1)
def _div(e, node):
    a, b = e.t(node.inputs[0]), e.t(node.inputs[1])
    # integer Div truncates toward zero in ONNX; lax.div does the same (jnp's // floors)
    e.out(
        f"(lax.div(*jnp.broadcast_arrays({a}, {b})) if jnp.issubdtype({a}.dtype, jnp.integer) else {a} / {b})"
    )


@R.register("Where", since=9)
def _where(e, node):
    c, a, b = (e.t(v) for v in node.inputs)
    e.out(f"jnp.where({c}, {a}, {b})")


@R.register("Cast", since=6)
def _cast(e, node):
    e.out(f"{e.t(node.inputs[0])}.astype(jnp.{ONNX_TO_NP[node.attrs['to']]})")


@R.register("Gelu", since=20)
def _gelu(e, node):
    approx = node.attrs.get("approximate", "none") == "tanh"
    e.out(f"jax.nn.gelu({e.t(node.inputs[0])}, approximate={approx})")
