"""What only the Paddle target has (the contract every target shares is test_convert_artifacts):
oneDNN and paddle.jit.load paths, every op case traced with dynamic dims and run by the predictor,
run-time sizes as arguments, weights files Paddle would accept silently, input checks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from convert_helpers import SHAPES, check, io_names, make_feeds  # noqa: E402

from slimm.convert import generate_source, import_generated  # noqa: E402
from slimm.convert.targets.paddle import runtime as RUNTIME  # noqa: E402
from slimm.convert.targets.paddle.codegen import TARGET  # noqa: E402
from slimm.errors import CheckpointError, InputError  # noqa: E402
from slimm.export.manifest import PARTS, part_file  # noqa: E402


@pytest.fixture(scope="session")
def paddle_dir(exported, converted):
    """paddle_dir(variant) -> (ONNX export dir, `slimm convert` Paddle dir, ONNX manifest); the export
    and the conversion are the session's shared ones (each part converted once)."""
    pytest.importorskip("torch")  # the exporter

    def get(variant: str):
        onnx_dir, out = exported(variant), converted("paddle", variant)
        manifest = json.loads((onnx_dir / "manifest.json").read_text())
        parts = json.loads((out / "manifest.json").read_text())["parts"]
        for part in PARTS:
            assert parts[part]["files"] == [f"SliMM_{part}.json", f"SliMM_{part}.pdiparams"]
            assert parts[part]["input_order"] == [name for name, _, _ in io_names(manifest, part)]
        return onnx_dir, out, manifest

    return get


def test_onednn_and_jit_load_give_the_same_results(paddle_dir):
    onnx_dir, out, manifest = paddle_dir("v1")
    names = [name for name, _, _ in io_names(manifest, "F")]
    feeds = make_feeds(manifest, "F", SHAPES[1], np.random.default_rng(3))
    ref = ort.InferenceSession(str(onnx_dir / part_file("F")), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )
    out_names = [t["name"] for t in manifest["parts"]["F"]["outputs"]]
    for what, run in (
        ("oneDNN", RUNTIME.load(out, "SliMM_F", threads=2, onednn=True)),
        ("jit.load", RUNTIME.load_layer(out, "SliMM_F")),
    ):
        check(run(*(feeds[n] for n in names)), ref, what, out_names)


def extra_cases() -> list:
    """Handler paths the shared one-node cases miss: other index forms, dtypes, attributes."""
    from convert_cases import Case, f32, i64

    x = f32(2, 3, 4)
    pos = np.abs(f32(2, 3, 4)) + 0.5
    return [
        Case(
            "Gather",
            [x, np.array([[0, -1], [2, 1]], np.int64)],
            {"axis": 1},
            static=[1],
            name="Gather-static-2d",
        ),
        Case("Gather", [f32(6, 4), i64(-1, 3, 0)], {"axis": 0}, name="Gather-runtime-1d-negative"),
        Case("Gather", [f32(5, 3), np.array(-2, np.int64)], {"axis": 1}, name="Gather-runtime-scalar"),
        Case("GatherND", [f32(4, 5, 3), np.array([[0, -1], [-4, 4]], np.int64)], name="GatherND-negative"),
        Case(
            "ScatterND", [f32(4, 5, 3), np.array([[0, 1], [3, -1]], np.int64), f32(2, 3)], name="ScatterND-k2"
        ),
        Case("Div", [np.array([7, -7, 6], np.int32), np.array([2], np.int32)], name="Div-int32-broadcast"),
        Case("Pow", [pos, np.array(3, np.int64)], static=[1], name="Pow-int-exponent"),
        Case(
            "Where",
            [np.array([[True, False, True]]), np.array(1.5, np.float32), f32(2, 1)],
            static=[1],
            name="Where-scalar",
        ),
        Case("Cast", [x], {"to": onnx.TensorProto.INT32}, name="Cast-float-int32"),
        Case("Cast", [x], {"to": onnx.TensorProto.FLOAT16}, name="Cast-float-half"),
        Case("Cast", [x.astype(np.float16)], {"to": onnx.TensorProto.FLOAT}, name="Cast-half-float"),
        Case("Cast", [x], {"to": onnx.TensorProto.BOOL}, name="Cast-float-bool"),
        Case("Cast", [np.array([True, False])], {"to": onnx.TensorProto.FLOAT}, name="Cast-bool-float"),
        Case("ReduceSum", [x], {"keepdims": 0}, name="ReduceSum-all"),
        Case(
            "ReduceSum",
            [np.array([[1, 2], [3, 4]], np.int32), i64(1)],
            {"keepdims": 0},
            static=[1],
            name="ReduceSum-int32",
        ),
        Case(
            "ReduceMax",
            [x, np.zeros(0, np.int64)],
            {"noop_with_empty_axes": 1},
            static=[1],
            name="Reduce-noop",
        ),
        Case(
            "ArgMin",
            [np.array([[2.0, 1.0, 1.0, 3.0]], np.float32)],
            {"axis": -1, "keepdims": 0, "select_last_index": 1},
            name="ArgMin-last-index",
        ),
        Case("Transpose", [x], name="Transpose-reverse"),
        Case(
            "LayerNormalization",
            [f32(2, 5, 8), f32(5, 8), f32(5, 8)],
            {"axis": -2},
            static=[1, 2],
            name="LayerNorm-two-axes",
        ),
        Case(
            "LayerNormalization",
            [f32(2, 5, 8), f32(8), f32(8)],
            {"epsilon": 1e-3},
            static=[1, 2],
            n_out=3,
            name="LayerNorm-mean-invstd",
        ),
        Case(
            "Conv",
            [f32(1, 4, 9), f32(6, 2, 3)],
            {"pads": [1, 2], "dilations": [2], "group": 2, "strides": [2]},
            static=[1],
            name="Conv1d-groups-dilation",
        ),
        Case(
            "Conv",
            [f32(1, 3, 6, 6), f32(4, 3, 3, 3), f32(4)],
            {"pads": [0, 1, 2, 1], "strides": [2, 1]},
            static=[1, 2],
            name="Conv2d-asymmetric-pads",
        ),
        Case(
            "CumSum",
            [f32(3, 4), np.array(-1, np.int64)],
            {"exclusive": 1, "reverse": 1},
            static=[1],
            name="CumSum-exclusive-reverse",
        ),
        Case(
            "CumSum",
            [np.array([[1, 2, 3]], np.int32), np.array(1, np.int64)],
            static=[1],
            name="CumSum-int32",
        ),
        Case("Trilu", [f32(4, 5)], {"upper": 1}, name="Trilu-upper"),
        Case(
            "Range",
            [np.array(0.5, np.float32), np.array(3.0, np.float32), np.array(0.75, np.float32)],
            static=[0, 1, 2],
            name="Range-float",
        ),
        Case("Split", [f32(7, 2)], {"axis": 0, "num_outputs": 3}, n_out=3, name="Split-uneven"),
        Case("Identity", [np.array([1, 2], np.int64)], name="Identity-int"),
    ]


def sized_model(nodes: list, inputs: dict, outputs: list[tuple[str, int]]):
    """A graph of a few nodes whose sizes flow from inputs (Shape -> ...): every input size dynamic."""
    from convert_cases import NP_TO_ONNX, opset_model
    from onnx import helper

    ins = [
        helper.make_tensor_value_info(n, NP_TO_ONNX[a.dtype.type], [f"{n}_{i}" for i in range(a.ndim)])
        for n, a in inputs.items()
    ]
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in outputs]
    return opset_model(helper.make_graph(nodes, "sized", ins, outs))


def sized_cases() -> list:
    """(name, model, feeds): run-time sizes used as Expand / Slice / ConstantOfShape / Tile
    arguments and as a tensor."""
    from convert_cases import f32, opset_model, shape_fold_model
    from onnx import TensorProto, helper, numpy_helper

    def node(op, ins, outs, **attrs):
        return helper.make_node(op, ins, outs, **attrs)

    def const(name, *vals):
        return node("Constant", [], [name], value=numpy_helper.from_array(np.array(vals, np.int64)))

    x, y, z = f32(3, 1), f32(1, 4), f32(2, 7)
    shape_y = node("Shape", ["y"], ["s"])
    graphs = {
        "Expand-both-ways-to-run-time-sizes": (
            [shape_y, node("Expand", ["x", "s"], ["o"])],
            TensorProto.FLOAT,
        ),
        "sizes-as-a-tensor": (
            [shape_y, node("Cast", ["s"], ["c"], to=TensorProto.FLOAT), node("Mul", ["c", "c"], ["o"])],
            TensorProto.FLOAT,
        ),
        "Slice-to-a-run-time-size": (
            [
                shape_y,
                const("zero", 0),
                const("one", 1),
                const("two", 2),
                node("Slice", ["s", "one", "two"], ["n"]),
                node("Slice", ["z", "zero", "n", "one"], ["o"]),
            ],
            TensorProto.FLOAT,
        ),
        "ConstantOfShape-of-run-time-sizes": (
            [
                shape_y,
                node("ConstantOfShape", ["s"], ["o"], value=numpy_helper.from_array(np.array([7], np.int64))),
            ],
            TensorProto.INT64,
        ),
        "Tile-by-run-time-sizes": ([shape_y, node("Tile", ["z", "s"], ["o"])], TensorProto.FLOAT),
    }
    cases = [("shape-fold", shape_fold_model(), {"x": f32(3, 2, 6)})]
    # a patch embedding: the kernel covers the whole (fixed-size) input, run as one matmul
    patches, w, b = f32(5, 3, 2, 4, 4), f32(6, 3, 2, 4, 4), f32(6)
    conv = helper.make_graph(
        [node("Conv", ["x", "w", "b"], ["o"], strides=[2, 4, 4])],
        "patch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 2, 4, 4])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    cases.append(("Conv-patch-embedding-as-matmul", opset_model(conv), {"x": patches}))
    for name, (nodes, out_type) in graphs.items():
        used = {i for n in nodes for i in n.input}
        feeds = {k: v for k, v in {"x": x, "y": y, "z": z}.items() if k in used}
        cases.append((name, sized_model(nodes, feeds, [("o", out_type)]), feeds))
    return cases


def op_models() -> list:
    from convert_cases import CASES

    cases = [
        (c.name, c.model(), c.feeds()) for c in CASES + extra_cases() if c.op in TARGET.registry.handlers
    ]
    return cases + sized_cases()


def test_jit_load_takes_a_program_without_weights(paddle_dir):
    onnx_dir, out, manifest = paddle_dir("plain")
    feeds = make_feeds(manifest, "E", SHAPES[1], np.random.default_rng(4))
    ref = ort.InferenceSession(str(onnx_dir / part_file("E")), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )
    assert (out / "SliMM_E.pdiparams").stat().st_size == 0
    check(RUNTIME.load_layer(out, "SliMM_E")(feeds["position_ids"]), ref, "jit.load E", ["cos", "sin"])


def test_op_cases_eagerly_and_through_the_saved_program(tmp_path):
    """The shared per-op cases, the paths they miss, and run-time sizes used as arguments: the eager
    Layer, then traced with every input size dynamic and run by the predictor (where run-time sizes
    are 0-d tensors, not the ints seen eagerly)."""
    for i, (name, model, feeds) in enumerate(op_models()):
        path = tmp_path / f"{i}.onnx"
        onnx.save(model, str(path))
        src, prog = generate_source(path, "paddle")
        gen = tmp_path / f"gen_{i}.py"
        gen.write_text(src)
        module = import_generated(gen)
        ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, feeds
        )
        args = [feeds[v.name] for v in prog.inputs]
        check(TARGET.runner(module, prog.weights)(*args), ref, f"{name} eager")
        inputs = [(v.name, v.dtype, [None] * len(v.shape)) for v in prog.inputs]
        if name.startswith("ScatterND"):  # the index tuple's length is fixed, as in the exports
            inputs[1][2][-1] = feeds["x1"].shape[-1]
        TARGET.save(module, prog.weights, inputs, tmp_path, f"case{i}")
        check(RUNTIME.load(tmp_path, f"case{i}")(*args), ref, f"{name} saved")


def test_scatter_nd_with_a_dynamic_index_length_is_a_clear_error_when_traced(tmp_path):
    from convert_cases import CASES

    case = next(c for c in CASES if c.op == "ScatterND")
    path = tmp_path / "m.onnx"
    onnx.save(case.model(), str(path))
    src, prog = generate_source(path, "paddle")
    (tmp_path / "gen.py").write_text(src)
    inputs = [(v.name, v.dtype, [None] * len(v.shape)) for v in prog.inputs]
    with pytest.raises(ValueError, match="index's last size must be fixed"):
        TARGET.save(import_generated(tmp_path / "gen.py"), prog.weights, inputs, tmp_path, "m")


BROKEN = {  # beyond the cases every target has (test_convert_artifacts): weights Paddle would take
    "weights-random": ("SliMM_B.pdiparams", "random"),
    "weights-of-another-part": ("SliMM_B.pdiparams", "SliMM_F.pdiparams"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_artifact_is_a_checkpoint_error_naming_the_file(paddle_dir, tmp_path, case):
    _, out, _ = paddle_dir("plain")
    for f in ("SliMM_B.json", "SliMM_B.pdiparams"):
        shutil.copyfile(out / f, tmp_path / f)
    name, content = BROKEN[case]
    path = tmp_path / name
    if content is None:
        path.unlink()
    else:
        if content == "half":
            content = (out / name).read_bytes()[: path.stat().st_size // 2]
        elif content == "random":
            content = np.random.default_rng(0).bytes(path.stat().st_size)
        elif isinstance(content, str):
            content = (out / content).read_bytes()
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path).replace(".", r"\.")):
        RUNTIME.load(tmp_path, "SliMM_B")


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "0 inputs given; the program takes 1"),
        (
            (np.zeros((1, 3), np.int32),),
            "'position_ids' is int32\\[1, 3\\]; the program takes int64\\[\\?, \\?\\]",
        ),
        ((np.zeros(3, np.int64),), "'position_ids' is int64\\[3\\]"),
    ],
    ids=["count", "dtype", "rank"],
)
def test_wrong_inputs_are_input_errors_naming_the_input(paddle_dir, args, message):
    _, out, _ = paddle_dir("plain")
    with pytest.raises(InputError, match=message):
        RUNTIME.load(out, "SliMM_E")(*args)


def test_wrong_fixed_size_is_an_input_error(paddle_dir):
    _, out, manifest = paddle_dir("plain")
    width = manifest["parts"]["B"]["inputs"][0]["dims"][1]
    feeds = make_feeds(manifest, "B", SHAPES[0], np.random.default_rng(0))
    feeds["pixel_values"] = feeds["pixel_values"][:, : width - 1]
    with pytest.raises(
        InputError,
        match=f"'pixel_values' is float32\\[24, {width - 1}\\]; the program takes float32\\[\\?, {width}\\]",
    ):
        RUNTIME.load(out, "SliMM_B")(*(feeds[n] for n, _, _ in io_names(manifest, "B")))
