"""Linear algebra and neural-network ops for MindSpore."""

from __future__ import annotations

import numpy as np

from slimm.convert.emitter import py_literal
from slimm.convert.targets.mindspore.registry import REGISTRY as R


def _static_2d(v) -> bool:
    return v.shape is not None and len(v.shape) == 2 and all(isinstance(d, int) for d in v.shape)


@R.register("MatMul", since=13)
def _matmul(e, node):
    a, b = node.inputs
    if _static_2d(b) and a.shape is not None and len(a.shape) >= 2:
        # (..., K) @ (K, N), a Linear layer: the MatMul primitive on 2-D rows. ops.matmul expands into
        # MatMulExt's reshapes and ran the 151k-column lm_head of a decode step 2.5x slower on CPU.
        k, n = b.shape
        if len(a.shape) == 2:
            e.out(f"ops.MatMul()({e.t(a)}, {e.t(b)})")
            return
        lead = e.dims(a)[:-1]
        e.out(
            f"ops.reshape(ops.MatMul()(ops.reshape({e.t(a)}, (-1, {k})), {e.t(b)}), {e.shape_code(lead + [n])})"
        )
        return
    r = len(a.shape) if a.shape is not None else 0
    if (
        r >= 3
        and b.shape is not None
        and len(b.shape) == r
        and all(e.same_size(a, i, b, i) for i in range(r - 2))
    ):
        # batch sizes known equal (attention's (batch, heads) axes): the BatchMatMul primitive.
        # ops.matmul broadcasts through BroadcastTo kernels and shape arithmetic first; at 0.5b that
        # made a decode step 135 ms against 106 ms. BatchMatMul itself does not broadcast on CPU.
        e.out(f"ops.BatchMatMul()({e.t(a)}, {e.t(b)})")
        return
    e.out(f"ops.matmul({e.t(a)}, {e.t(b)})")


@R.register("Gemm", since=13)
def _gemm(e, node):
    product, c = e.gemm(lambda a, b, ta, tb: f"ops.MatMul({ta}, {tb})({a}, {b})")
    if c is None:
        e.out(product)
        return
    # C broadcast explicitly to the (M, N) product: CPU Add broadcasting a bias row keeps a full-size
    # temporary alive to the end of the graph (see elementwise.operands)
    e.line(f"_mm = {product}")
    e.out(f"ops.add(_mm, ops.broadcast_to({c}, (_mm.shape[0], _mm.shape[1])))")


@R.register("Softmax", since=13)
def _softmax(e, node):
    e.out(f"ops.softmax({e.t(node.inputs[0])}, {node.attrs.get('axis', -1)})")


@R.register("LayerNormalization", since=17)
def _layer_norm(e, node):
    # ops.LayerNorm (the primitive): the functional ops.layer_norm has no CPU kernel. Statistics and the
    # affine part in float32, then back to the input's type.
    x = e.t(node.inputs[0])
    axis = node.attrs.get("axis", -1)
    eps = float(node.attrs.get("epsilon", 1e-5))
    if node.inputs[0].shape is None:
        raise e.error("the rank of the input is unknown at conversion time")
    rank = len(node.inputs[0].shape)
    axis = axis + rank if axis < 0 else axis
    g = f"ops.cast({e.t(node.inputs[1])}, mindspore.float32)"
    b = f"ops.cast({e.t(node.inputs[2])}, mindspore.float32)" if e.has(2) else f"ops.zeros_like({g})"
    e.line(
        f"_y, _m, _v = ops.LayerNorm({axis}, {axis}, {py_literal(eps)})(ops.cast({x}, mindspore.float32), {g}, {b})"
    )
    e.out(f"ops.cast(_y, {x}.dtype)", 0)
    if len(node.outputs) > 1:
        e.out("_m", 1)
    if len(node.outputs) > 2:
        e.out(f"ops.rsqrt(_v + {py_literal(eps)})", 2)


@R.register("Conv", since=11)
def _conv(e, node):
    x, w = node.inputs[0], node.inputs[1]
    n_sp = len(w.shape) - 2
    if n_sp not in (2, 3):
        raise e.error(f"{n_sp}-D convolution is not supported (2-D and 3-D are)")
    strides = tuple(node.attrs.get("strides", [1] * n_sp))
    dil = tuple(node.attrs.get("dilations", [1] * n_sp))
    pads = node.attrs.get("pads", [0] * (2 * n_sp))
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise e.error(f"auto_pad {node.attrs['auto_pad']!r} is not supported")
    xc = e.t(x)
    spatial = list(x.static.shape if x.is_static else (x.shape or ()))[2:]  # ints, or Syms / None
    covered = len(spatial) == n_sp and all(
        isinstance(d, int) and d == k for d, k in zip(spatial, w.shape[2:], strict=True)
    )
    if covered and not any(pads) and dil == (1,) * n_sp and node.attrs.get("group", 1) == 1:
        # the kernel covers the whole input (the patch embedding): one matmul over flattened patches;
        # MindSpore's CPU Conv3D took 444 ms for 1024 patches of 3x2x14x14, this 2.5 ms
        out, k = int(w.shape[0]), int(np.prod(w.shape[1:]))
        y = f"ops.MatMul(False, True)(ops.reshape({xc}, (-1, {k})), ops.reshape({e.t(w)}, ({out}, {k})))"
        if e.has(2):
            y = f"({y} + {e.t(node.inputs[2])})"
        e.out(f"ops.reshape({y}, (-1, {out}{', 1' * n_sp}))")
        return
    if any(pads):
        # ONNX pads are (begin..., end...) per spatial axis; ops.pad wants (last begin, last end, ...)
        pad = tuple(p for i in reversed(range(n_sp)) for p in (pads[i], pads[i + n_sp]))
        xc = f"ops.pad({xc}, {pad!r})"
    # the primitive, not ops.conv2d/conv3d: those check `in_channel % groups` in Python, which with a
    # dynamic channel dim becomes a `raise` node that a reloaded MINDIR cannot infer
    if not all(isinstance(d, int) for d in w.shape):
        raise e.error("the weight's shape must be known at conversion time")
    prim = "ops.Conv2D" if n_sp == 2 else "ops.Conv3D"
    fmt = "NCHW" if n_sp == 2 else "NCDHW"
    conv = (
        f"{prim}({w.shape[0]}, {tuple(w.shape[2:])!r}, 1, 'valid', 0, {strides!r}, {dil!r}, "
        f"{node.attrs.get('group', 1)}, {fmt!r})({xc}, {e.t(w)})"
    )
    e.out(f"ops.bias_add({conv}, {e.t(node.inputs[2])})" if e.has(2) else conv)
