"""The converter tests' op cases: one-node ONNX graphs (`Case`, `CASES`, one or more per registered
handler) and small multi-node graphs (`shape_fold_model`), all at opset 20 (`opset_model`)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

OPSET = 20
NP_TO_ONNX = {
    np.float32: TensorProto.FLOAT,
    np.int64: TensorProto.INT64,
    np.bool_: TensorProto.BOOL,
    np.float16: TensorProto.FLOAT16,
    np.int32: TensorProto.INT32,
}
R = np.random.default_rng(0)


def opset_model(graph, opset: int = OPSET, **kwargs):
    """A ModelProto of `graph` at this opset and IR version 9 (read by every onnxruntime in the extra)."""
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kwargs)
    m.ir_version = 9
    return m


def f32(*shape):
    return R.standard_normal(shape).astype(np.float32)


def i64(*vals):
    return np.array(vals, dtype=np.int64)


class Case:
    def __init__(
        self,
        op,
        inputs,
        attrs=None,
        static=(),
        n_out=1,
        opset=OPSET,
        name=None,
        out_types=None,
        dim_names=None,
    ):
        self.op, self.inputs, self.attrs = op, inputs, attrs or {}
        self.static, self.n_out, self.opset = set(static), n_out, opset
        self.name = name or op
        self.out_types = out_types
        self.dim_names = dim_names  # per input, symbolic size names (shared names: sizes known equal)

    def model(self):
        ins, inits, names = [], [], []
        for k, arr in enumerate(self.inputs):
            if arr is None:
                names.append("")
                continue
            name = f"x{k}"
            names.append(name)
            if k in self.static:
                inits.append(numpy_helper.from_array(arr, name))
            else:
                # dynamic: the converter must not bake sizes
                dims = self.dim_names[k] if self.dim_names else [f"d{k}_{i}" for i in range(arr.ndim)]
                ins.append(helper.make_tensor_value_info(name, NP_TO_ONNX[arr.dtype.type], dims))
        node = helper.make_node(self.op, names, [f"y{k}" for k in range(self.n_out)], **self.attrs)

        def build(outs):
            return opset_model(helper.make_graph([node], "g", ins, outs, inits), self.opset)

        # output types from ONNX's reference evaluator; sizes left dynamic
        from onnx.reference import ReferenceEvaluator

        probe = build(
            [helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, None) for k in range(self.n_out)]
        )
        results = ReferenceEvaluator(probe).run(None, self.feeds())
        outs = [
            helper.make_tensor_value_info(
                f"y{k}",
                NP_TO_ONNX[np.asarray(r).dtype.type],
                [f"o{k}_{i}" for i in range(np.asarray(r).ndim)],
            )
            for k, r in enumerate(results)
        ]
        return build(outs)

    def feeds(self):
        return {f"x{k}": a for k, a in enumerate(self.inputs) if a is not None and k not in self.static}


def ramp_cases() -> list[Case]:
    x = f32(2, 3, 4)
    pos = np.abs(f32(2, 3, 4)) + 0.5
    cases = []
    for op in ("Add", "Sub", "Mul", "Div", "Max", "Min"):
        cases.append(Case(op, [x, f32(3, 4)], name=f"{op}-broadcast"))
    for op in ("Max", "Min", "Sum", "Mean"):  # any number of inputs, broadcast together
        cases.append(Case(op, [x, f32(3, 4), f32(4)], name=f"{op}-three"))
    cases.append(Case("Sum", [x], name="Sum-one"))
    cases += [
        Case("Div", [i64(7, -7, 9), i64(2, 2, -4)], name="Div-int-truncates"),
        Case("Pow", [pos, np.array(2.0, np.float32)], static=[1]),
        Case("Equal", [i64(1, 2, 3), i64(1, 0, 3)]),
        Case("Less", [x, f32(2, 3, 4)]),
        Case("LessOrEqual", [i64(1, 2, 3), i64(2, 2, 2)]),
        Case("Greater", [x, f32(2, 3, 4)]),
        Case("GreaterOrEqual", [i64(1, 2, 3), i64(2, 2, 2)]),
        Case("And", [np.array([True, False, True]), np.array([True, True, False])]),
        Case("Or", [np.array([True, False, False]), np.array([False, False, True])]),
        Case("Xor", [np.array([True, False, True]), np.array([True, True, False])]),
        Case("Not", [np.array([True, False])]),
        Case("Where", [np.array([[True], [False]]), f32(2, 3), f32(1, 3)]),
        # sizes named alike: the broadcast is resolved at conversion time (an attention mask)
        Case(
            "Where",
            [R.random((3, 5)) > 0.5, np.array(-1e9, np.float32), f32(2, 3, 5)],
            dim_names=[["p", "q"], [], [2, "p", "q"]],
            name="Where-mask-named-sizes",
        ),
        Case("Cast", [x], {"to": TensorProto.INT64}, name="Cast-float-int"),
        Case("Cast", [i64(1, 2)], {"to": TensorProto.FLOAT}, name="Cast-int-float"),
        Case("Cast", [i64(0, 2)], {"to": TensorProto.BOOL}, name="Cast-int-bool"),
        Case("Gelu", [x], {"approximate": "none"}),
        Case("Gelu", [x], {"approximate": "tanh"}, name="Gelu-tanh"),
    ]
    for op in (
        "Neg",
        "Sqrt",
        "Reciprocal",
        "Sin",
        "Cos",
        "Sigmoid",
        "Exp",
        "Log",
        "Tanh",
        "Abs",
        "Erf",
        "Relu",
        "Floor",
        "Ceil",
        "Identity",
    ):
        cases.append(Case(op, [pos if op in ("Sqrt", "Log", "Reciprocal") else x]))
    return cases


def reduce_cases() -> list[Case]:
    x = f32(2, 3, 4)
    cases = []
    for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd"):
        cases.append(Case(op, [x, i64(-1)], {"keepdims": 1}, static=[1]))
        cases.append(Case(op, [x, i64(0, 2)], {"keepdims": 0}, static=[1], name=f"{op}-two-axes"))
        cases.append(
            Case(
                op,
                [x],
                {"axes": [1], "keepdims": 1},
                opset=13 if op != "ReduceSum" else 11,
                name=f"{op}-attr-axes",
            )
        )
    cases += [
        Case("ArgMax", [x], {"axis": -1, "keepdims": 0}),
        Case(
            "ArgMax",
            [np.array([[1.0, 3.0, 3.0]], np.float32)],
            {"axis": 1, "select_last_index": 1},
            name="ArgMax-last-index",
        ),
        Case("ArgMin", [x], {"axis": 1, "keepdims": 1}),
    ]
    return cases


def nn_cases() -> list[Case]:
    return [
        Case("MatMul", [f32(2, 5, 3), f32(3, 4)], name="MatMul-weight"),
        # a stored weight (an initializer big enough to be kept as one): targets may keep it transposed
        Case("MatMul", [f32(2, 5, 16), f32(16, 24)], static=(1,), name="MatMul-stored-weight"),
        Case("MatMul", [f32(16), f32(16, 24)], static=(1,), name="MatMul-stored-weight-1d"),
        Case("MatMul", [f32(2, 2, 5, 3), f32(2, 2, 3, 6)], name="MatMul-batched"),
        # batch sizes named alike (known equal, as in attention) and broadcast ones (1 against 3)
        Case(
            "MatMul",
            [f32(2, 3, 5, 4), f32(2, 3, 4, 6)],
            name="MatMul-batched-same-sizes",
            dim_names=[["b", "h", "m", "k"], ["b", "h", "k", "n"]],
        ),
        Case(
            "MatMul",
            [f32(2, 1, 5, 4), f32(2, 3, 4, 6)],
            name="MatMul-batched-broadcast",
            dim_names=[["b", 1, "m", "k"], ["b", 3, "k", "n"]],
        ),
        Case("Gemm", [f32(4, 3), f32(5, 3), f32(5)], {"transB": 1}),
        Case(
            "Gemm",
            [f32(3, 4), f32(3, 5), f32(4, 5)],
            {"transA": 1, "alpha": 0.5, "beta": 2.0},
            name="Gemm-transA",
        ),
        Case("Softmax", [f32(2, 3, 7)], {"axis": -1}),
        Case("Softmax", [f32(2, 3, 7)], {"axis": 1}, name="Softmax-axis1"),
        Case("LayerNormalization", [f32(2, 5, 8), f32(8), f32(8)], {"epsilon": 1e-6}, static=[1, 2]),
        Case(
            "LayerNormalization", [f32(2, 5, 8), f32(8)], {"axis": -1}, static=[1], name="LayerNorm-no-bias"
        ),
        Case(
            "Conv",
            [f32(3, 2, 2, 4, 4), f32(5, 2, 2, 4, 4)],
            {"strides": [2, 4, 4]},
            static=[1],
            name="Conv3d-patch",
        ),
        Case(
            "Conv",
            [f32(1, 3, 6, 6), f32(4, 3, 3, 3), f32(4)],
            {"pads": [1, 1, 1, 1]},
            static=[1, 2],
            name="Conv2d-pad",
        ),
    ]


def tensor_cases() -> list[Case]:
    x = f32(2, 3, 4)
    return [
        Case("Reshape", [x, i64(2, 12)], static=[1]),
        Case("Reshape", [x, i64(0, -1)], static=[1], name="Reshape-zero-minus-one"),
        Case("Transpose", [x], {"perm": [2, 0, 1]}),
        Case("Concat", [x, f32(2, 1, 4)], {"axis": 1}),
        Case("Squeeze", [f32(2, 1, 4), i64(1)], static=[1]),
        Case("Unsqueeze", [x, i64(0, -1)], static=[1]),
        Case("Slice", [x, i64(1), i64(3), i64(1)], static=[1, 2, 3]),
        Case(
            "Slice",
            [x, i64(0, 3), i64(np.iinfo(np.int64).max, 0), i64(0, 2), i64(1, -1)],
            static=[1, 2, 3, 4],
            name="Slice-int64max-and-negative-step",
        ),
        Case("Slice", [x, i64(-3), i64(-1), i64(-1)], static=[1, 2, 3], name="Slice-negative"),
        Case("Split", [f32(2, 9), i64(2, 3, 4)], {"axis": 1}, static=[1], n_out=3),
        Case("Split", [f32(6, 2)], {"axis": 0, "num_outputs": 3}, n_out=3, name="Split-equal"),
        Case("Expand", [f32(3, 1), i64(2, 1, 4)], static=[1]),
        Case("Gather", [x, i64(2, 0)], {"axis": 1}, static=[1], name="Gather-static-index"),
        Case(
            "Gather",
            [f32(10, 4), np.array([[1, -1], [3, 0]], np.int64)],
            {"axis": 0},
            name="Gather-runtime-index",
        ),
        Case("Gather", [x, np.array(1, np.int64)], {"axis": 2}, static=[1], name="Gather-scalar-index"),
        Case("GatherND", [f32(4, 5, 3), np.array([[0, 1], [3, 4]], np.int64)]),
        Case("ScatterND", [f32(6, 3), np.array([[4], [1]], np.int64), f32(2, 3)]),
        Case(
            "ScatterND",
            [f32(6, 3), np.array([[4], [1]], np.int64), f32(2, 3)],
            {"reduction": "add"},
            name="ScatterND-add",
        ),
        Case(
            "Range", [np.array(2, np.int64), np.array(11, np.int64), np.array(3, np.int64)], static=[0, 1, 2]
        ),
        Case(
            "ConstantOfShape",
            [i64(2, 3)],
            {"value": numpy_helper.from_array(np.array([1.5], np.float32))},
            static=[0],
        ),
        Case("Tile", [f32(2, 3), i64(2, 1)], static=[1]),
        Case("Trilu", [f32(4, 4), np.array(1, np.int64)], {"upper": 0}, static=[1]),
        Case("CumSum", [f32(3, 4), np.array(1, np.int64)], {"exclusive": 1}, static=[1]),
        Case("CumSum", [f32(3, 4), np.array(0, np.int64)], {"reverse": 1}, static=[1], name="CumSum-reverse"),
    ]


CASES = ramp_cases() + reduce_cases() + nn_cases() + tensor_cases()


def shape_fold_model():
    """Shape -> Gather -> Concat -> Reshape and Range(0, Shape[1]): run-time sizes folded into code."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    r = helper.make_tensor_value_info("r", TensorProto.INT64, None)
    inits = [
        numpy_helper.from_array(i64(0), "i0"),
        numpy_helper.from_array(i64(1), "i1"),
        numpy_helper.from_array(i64(2, 3), "tail"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(i64(0), "ax0"),
    ]
    nodes = [
        helper.make_node("Shape", ["x"], ["sh"]),
        helper.make_node("Gather", ["sh", "i0"], ["b"], axis=0),
        helper.make_node("Gather", ["sh", "i1"], ["s"], axis=0),
        helper.make_node("Concat", ["b", "s", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
        helper.make_node("Squeeze", ["s", "ax0"], ["s0"]),
        helper.make_node("Range", ["zero", "s0", "one"], ["r"]),
    ]
    return opset_model(helper.make_graph(nodes, "fold", [x], [y, r], inits))
