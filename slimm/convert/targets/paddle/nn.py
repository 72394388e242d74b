"""Linear algebra and neural-network ops for Paddle (float32 stays float32: Paddle's CPU kernels
have no reduced-precision matmul path)."""

from __future__ import annotations

import numpy as np

from slimm.convert.emitter import py_literal
from slimm.convert.targets.paddle.registry import REGISTRY as R


@R.register("MatMul", since=13)
def _matmul(e, node):
    e.out(f"paddle.matmul({e.t(node.inputs[0])}, {e.t(node.inputs[1])})")


@R.register("Gemm", since=13)
def _gemm(e, node):
    product, c = e.gemm(lambda a, b, ta, tb: f"paddle.matmul({a}, {b}, transpose_x={ta}, transpose_y={tb})")
    e.out(product if c is None else f"({product} + {c})")


@R.register("Softmax", since=13)
def _softmax(e, node):
    e.out(f"F.softmax({e.t(node.inputs[0])}, axis={node.attrs.get('axis', -1)})")


@R.register("LayerNormalization", since=17)
def _layer_norm(e, node):
    xv = node.inputs[0]
    if xv.shape is None:
        raise e.error("the input's rank is unknown at conversion time")
    x = e.t(xv)
    rank = len(xv.shape)
    axis = node.attrs.get("axis", -1)
    axis = axis + rank if axis < 0 else axis
    eps = node.attrs.get("epsilon", 1e-5)
    scale, bias = node.inputs[1], node.inputs[2] if e.has(2) else None
    if len(node.outputs) == 1 and axis == rank - 1 and _vector(scale) and (bias is None or _vector(bias)):
        # Paddle's fused kernel normalises in float32 (ONNX's default stash_type)
        n = _length(scale)
        b = e.t(bias) if bias is not None else "None"
        e.out(f"F.layer_norm({x}, [{n}], weight={e.t(scale)}, bias={b}, epsilon={py_literal(eps)})")
        return
    axes = list(range(axis, rank))
    e.line(f"_x = paddle.cast({x}, 'float32')")
    e.line(f"_m = paddle.mean(_x, axis={axes!r}, keepdim=True)")
    e.line(f"_v = paddle.mean(paddle.square(_x - _m), axis={axes!r}, keepdim=True)")
    e.line(f"_inv = paddle.rsqrt(_v + {py_literal(eps)})")
    y = f"paddle.cast((_x - _m) * _inv, {x}.dtype) * {e.t(scale)}"
    if bias is not None:
        y = f"{y} + {e.t(bias)}"
    e.out(y, 0)
    if len(node.outputs) > 1:
        e.out("_m", 1)
    if len(node.outputs) > 2:
        e.out("_inv", 2)


def _vector(v) -> bool:
    shape = v.static.shape if v.is_static else v.shape
    return shape is not None and len(shape) == 1 and isinstance(shape[0], int)


def _length(v) -> int:
    return int((v.static.shape if v.is_static else v.shape)[0])


@R.register("Conv", since=11)
def _conv(e, node):
    x, w = node.inputs[0], node.inputs[1]
    wshape = w.static.shape if w.is_static else w.shape
    if wshape is None:
        raise e.error("the kernel's rank is unknown at conversion time")
    n_sp = len(wshape) - 2
    if not 1 <= n_sp <= 3:
        raise e.error(f"{n_sp}-D convolution is not supported")
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise e.error(f"auto_pad {node.attrs['auto_pad']!r} is not supported")
    strides = list(node.attrs.get("strides", [1] * n_sp))
    dil = list(node.attrs.get("dilations", [1] * n_sp))
    pads = list(node.attrs.get("pads", [0] * (2 * n_sp)))
    begin, end = pads[:n_sp], pads[n_sp:]
    # ONNX lists all begins then all ends; Paddle takes one (begin, end) pair per axis, N and C included
    padding = begin if begin == end else [[0, 0], [0, 0]] + [[b, a] for b, a in zip(begin, end, strict=True)]
    bias = e.t(node.inputs[2]) if e.has(2) else "None"
    spatial = list((x.static.shape if x.is_static else (x.shape or ()))[2:])
    whole = len(spatial) == n_sp and all(
        isinstance(d, int | np.integer) and d == k for d, k in zip(spatial, wshape[2:], strict=True)
    )
    if whole and not any(pads) and dil == [1] * n_sp and node.attrs.get("group", 1) == 1:
        # the kernel covers the whole input (a patch embedding): one matmul over flattened patches,
        # about 4x faster than Paddle's CPU conv3d here
        out, k = int(wshape[0]), int(np.prod(wshape[1:]))
        e.line(
            f"_y = paddle.matmul(paddle.reshape({e.t(x)}, [-1, {k}]), paddle.reshape({e.t(w)}, [{out}, {k}]), "
            "transpose_y=True)"
        )
        if e.has(2):
            e.line(f"_y = _y + {bias}")
        e.out(f"paddle.reshape(_y, [-1, {out}{', 1' * n_sp}])")
        return
    e.out(
        f"F.conv{n_sp}d({e.t(x)}, {e.t(w)}, bias={bias}, stride={strides!r}, padding={padding!r}, "
        f"dilation={dil!r}, groups={node.attrs.get('group', 1)})"
    )
