"""What only the MindSpore target has (the contract every target shares is test_convert_artifacts):
saving over an older artifact, the split export of large graphs, weights as Parameters, every op
case and the handler paths through MINDIR with dynamic dims, memory of broadcasting kernels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from prompts import run_python

ms = pytest.importorskip("mindspore")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from convert_helpers import SHAPES, check, io_names, make_feeds, ort_run, run_saved  # noqa: E402

from slimm.convert import generate_source, import_generated  # noqa: E402
from slimm.convert.targets.mindspore import runtime as RUNTIME  # noqa: E402
from slimm.convert.targets.mindspore.codegen import TARGET  # noqa: E402
from slimm.export.manifest import part_file  # noqa: E402


@pytest.fixture(scope="session")
def mindir(exported, converted):
    """mindir(variant) -> (ONNX export dir, converted MINDIR dir, export manifest), shared with the
    other test modules through the session-wide fixtures."""

    def get(variant: str):
        onnx_dir = exported(variant)
        out = converted("mindspore", variant)
        return onnx_dir, out, json.loads((onnx_dir / "manifest.json").read_text())

    return get


def test_save_replaces_an_older_artifact_and_leaves_files_readable(mindir, tmp_path):
    onnx_dir, _, manifest = mindir("plain")
    src, prog = generate_source(onnx_dir / part_file("E"), "mindspore")
    gen = tmp_path / "gen_E.py"
    gen.write_text(src)
    module = import_generated(gen)
    (tmp_path / "SliMM_E.mindir").write_bytes(b"stale")
    files = TARGET.save(module, prog.weights, io_names(manifest, "E"), tmp_path, "SliMM_E")
    assert files == ["SliMM_E.mindir"]
    assert (tmp_path / "SliMM_E.mindir").stat().st_mode & 0o777 == 0o644
    feeds = make_feeds(manifest, "E", SHAPES[0], np.random.default_rng(0))
    sess = ort.InferenceSession(str(onnx_dir / part_file("E")), providers=["CPUExecutionProvider"])
    check(
        RUNTIME.load(tmp_path, "SliMM_E")(feeds["position_ids"]), sess.run(None, feeds), "E", ["cos", "sin"]
    )


def test_graph_over_the_size_limit_is_saved_split_and_loads(mindir, tmp_path, monkeypatch):
    """Over 1 GB of parameters MindSpore writes <name>_graph.mindir + <name>_variables/data_*; the
    limit lowered to 1 KB makes the tiny decoder take that path."""
    import mindspore.train.serialization as serialization

    onnx_dir, out, manifest = mindir("plain")
    _, prog = generate_source(onnx_dir / part_file("F"), "mindspore")
    monkeypatch.setattr(serialization, "TOTAL_SAVE", 1)
    files = TARGET.save(
        import_generated(out / "SliMM_F.py"), prog.weights, io_names(manifest, "F"), tmp_path, "F"
    )
    assert files == ["F_graph.mindir", "F_variables/data_0"]
    names = [name for name, _, _ in io_names(manifest, "F")]
    feeds = make_feeds(manifest, "F", SHAPES[0], np.random.default_rng(3))
    sess = ort.InferenceSession(str(onnx_dir / part_file("F")), providers=["CPUExecutionProvider"])
    got = RUNTIME.load(tmp_path, "F")(*(feeds[n] for n in names))
    check(got, sess.run(None, feeds), "split F", [t["name"] for t in manifest["parts"]["F"]["outputs"]])


def test_generated_cell_holds_weights_as_parameters(mindir):
    onnx_dir, out, _ = mindir("plain")
    module = import_generated(out / "SliMM_F.py")
    _, prog = generate_source(onnx_dir / part_file("F"), "mindspore")
    cell = module.Model(prog.weights)
    params = {p.name for p in cell.get_parameters()}
    assert params == set(prog.weights) and params
    assert "lambda" not in Path(out / "SliMM_F.py").read_text()  # graph mode parses the source


# ---- every op through MINDIR: the per-op cases exported with every dim dynamic -----------------------
def _op_cases():
    from convert_cases import CASES

    return CASES


@pytest.mark.parametrize("case", _op_cases(), ids=lambda c: c.name)
def test_op_case_through_mindir_with_dynamic_dims(case, tmp_path):
    model = case.model()
    (got,) = run_saved("mindspore", model, [case.feeds()], tmp_path)
    check(got, ort_run(model, case.feeds()), f"mindir {case.name}")


# ---- handler paths the one-node cases do not reach, at two shapes through MINDIR --------------------
def graph(nodes, inputs, outputs, inits=()):
    """A small opset-20 model; inputs/outputs as (name, numpy dtype, rank) with every dim dynamic."""
    from convert_cases import NP_TO_ONNX, opset_model
    from onnx import helper, numpy_helper

    def vi(name, dtype, rank):
        return helper.make_tensor_value_info(
            name, NP_TO_ONNX[np.dtype(dtype).type], [f"{name}_{i}" for i in range(rank)]
        )

    g = helper.make_graph(
        [helper.make_node(op, ins, outs, **attrs) for op, ins, outs, attrs in nodes],
        "g",
        [vi(*i) for i in inputs],
        [vi(*o) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits],
    )
    return opset_model(g)


def _r(*shape):
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


def _ints(*shape, lo=-9, hi=9):
    return np.random.default_rng(sum(shape)).integers(lo, hi, shape).astype(np.int64)


PATH_CASES = {
    # Div of intermediates: the dtype is known only to the graph compiler (int truncates, float divides)
    "div-intermediate-int": (
        graph(
            [("Add", ["a", "b"], ["t"], {}), ("Div", ["t", "b"], ["y"], {})],
            [("a", np.int64, 1), ("b", np.int64, 1)],
            [("y", np.int64, 1)],
        ),
        [
            {"a": _ints(5), "b": np.array([2, -3, 4, -5, 7], np.int64)},
            {"a": _ints(8), "b": np.array([2, -3, 4, -5, 7, 3, -2, 9], np.int64)},
        ],
    ),
    "div-intermediate-float": (
        graph(
            [("Add", ["a", "b"], ["t"], {}), ("Div", ["t", "b"], ["y"], {})],
            [("a", np.float32, 2), ("b", np.float32, 2)],
            [("y", np.float32, 2)],
        ),
        [{"a": _r(2, 3), "b": _r(2, 3) + 3}, {"a": _r(4, 5), "b": _r(4, 5) + 3}],
    ),
    # a static negative index into an axis whose size is known only at run time
    "gather-negative-static-index": (
        graph(
            [("Gather", ["x", "i"], ["y"], {"axis": 1})],
            [("x", np.float32, 3)],
            [("y", np.float32, 3)],
            [("i", np.array([-1, 0, -2], np.int64))],
        ),
        [{"x": _r(2, 3, 4)}, {"x": _r(3, 7, 2)}],
    ),
    # run-time sizes used as a tensor (Shape -> Add): sizes_tensor
    "sizes-as-tensor": (
        graph(
            [("Shape", ["x"], ["s"], {}), ("Add", ["s", "k"], ["y"], {})],
            [("x", np.float32, 3), ("k", np.int64, 1)],
            [("y", np.int64, 1)],
        ),
        [{"x": _r(2, 3, 4), "k": _ints(3)}, {"x": _r(5, 1, 2), "k": _ints(3)}],
    ),
    # Expand with sizes known after Reshape (broadcast_to), and of a bool tensor with run-time sizes
    "expand-known-dims": (
        graph(
            [("Reshape", ["x", "s"], ["r"], {}), ("Expand", ["r", "t"], ["y"], {})],
            [("x", np.float32, 2)],
            [("y", np.float32, 3)],
            [("s", np.array([3, 1], np.int64)), ("t", np.array([2, 1, 4], np.int64))],
        ),
        [{"x": _r(1, 3)}, {"x": _r(3, 1)}],
    ),
    "expand-bool-run-time-dims": (
        graph(
            [("Expand", ["x", "t"], ["y"], {})],
            [("x", np.bool_, 2)],
            [("y", np.bool_, 3)],
            [("t", np.array([2, 1, 4], np.int64))],
        ),
        [{"x": _r(3, 1) > 0}, {"x": _r(5, 4) > 0}],
    ),
    # Range too long to fold into a constant: a run-time node with static float bounds
    "range-float-unfolded": (
        graph(
            [("Range", ["a", "b", "c"], ["r"], {}), ("Add", ["r", "x"], ["y"], {})],
            [("x", np.float32, 1)],
            [("y", np.float32, 1)],
            [
                ("a", np.array(0.5, np.float32)),
                ("b", np.array(2500.0, np.float32)),
                ("c", np.array(0.5, np.float32)),
            ],
        ),
        [{"x": _r(1)}, {"x": _r(4999)}],
    ),
    "gathernd-scatternd-negative-indices": (
        graph(
            [
                ("GatherND", ["x", "i"], ["g"], {}),
                ("ScatterND", ["x", "i", "g"], ["s"], {"reduction": "add"}),
            ],
            [("x", np.float32, 3), ("i", np.int64, 2)],
            [("g", np.float32, 2), ("s", np.float32, 3)],
        ),
        [
            {"x": _r(4, 5, 3), "i": np.array([[0, -1], [-4, 2]], np.int64)},
            {"x": _r(6, 2, 5), "i": np.array([[-1, 1], [2, -2], [0, 0]], np.int64)},
        ],
    ),
    "layernorm-mean-and-inv-std": (
        graph(
            [("LayerNormalization", ["x", "g", "b"], ["y", "m", "r"], {"axis": -1, "epsilon": 1e-5})],
            [("x", np.float32, 3)],
            [("y", np.float32, 3), ("m", np.float32, 3), ("r", np.float32, 3)],
            [("g", _r(8)), ("b", _r(8))],
        ),
        [{"x": _r(2, 5, 8)}, {"x": _r(1, 3, 8)}],
    ),
    "argmax-last-index-ties": (
        graph(
            [("ArgMax", ["x"], ["y"], {"axis": 0, "keepdims": 0, "select_last_index": 1})],
            [("x", np.float32, 2)],
            [("y", np.int64, 1)],
        ),
        [{"x": np.round(_r(6, 3))}, {"x": np.round(_r(9, 2))}],
    ),
    "max-three-inputs-and-pow-3": (
        graph(
            [("Max", ["a", "b", "c"], ["m"], {}), ("Pow", ["m", "p"], ["y"], {})],
            [("a", np.float32, 2), ("b", np.float32, 2), ("c", np.float32, 2)],
            [("y", np.float32, 2)],
            [("p", np.array(3.0, np.float32))],
        ),
        [{"a": _r(2, 3), "b": _r(2, 3) * 2, "c": _r(1, 3)}, {"a": _r(4, 1), "b": _r(4, 2), "c": _r(1, 2)}],
    ),
    # a Linear layer (stored 2-D weight): the MatMul primitive over rows, for 3-D and 2-D inputs
    "matmul-stored-weight": (
        graph(
            [("MatMul", ["x", "w"], ["y"], {}), ("MatMul", ["z", "w"], ["y2"], {})],
            [("x", np.float32, 3), ("z", np.float32, 2)],
            [("y", np.float32, 3), ("y2", np.float32, 2)],
            [("w", _r(8, 16))],
        ),
        [{"x": _r(2, 5, 8), "z": _r(3, 8)}, {"x": _r(1, 1, 8), "z": _r(7, 8)}],
    ),
    # a Conv whose kernel covers its (reshaped, statically known) input: the patch embedding as a matmul
    "conv3d-patch-embedding-as-matmul": (
        graph(
            [("Reshape", ["x", "s"], ["r"], {}), ("Conv", ["r", "w", "b"], ["y"], {"strides": [2, 4, 4]})],
            [("x", np.float32, 2)],
            [("y", np.float32, 5)],
            [("s", np.array([-1, 2, 2, 4, 4], np.int64)), ("w", _r(5, 2, 2, 4, 4)), ("b", _r(5))],
        ),
        [{"x": _r(3, 64)}, {"x": _r(7, 64)}],
    ),
    "split-uneven-transpose-default-cumsum-both": (
        graph(
            [
                ("Split", ["x"], ["p", "q", "r"], {"axis": 1, "num_outputs": 3}),
                ("Transpose", ["p"], ["t"], {}),
                ("CumSum", ["r", "ax"], ["c"], {"exclusive": 1, "reverse": 1}),
            ],
            [("x", np.float32, 2)],
            [("t", np.float32, 2), ("q", np.float32, 2), ("c", np.float32, 2)],
            [("ax", np.array(1, np.int64))],
        ),
        [{"x": _r(2, 7)}, {"x": _r(3, 11)}],
    ),
}


@pytest.mark.parametrize("name", list(PATH_CASES))
def test_handler_path_through_mindir_at_two_shapes(name, tmp_path):
    model, feed_sets = PATH_CASES[name]
    for k, got in enumerate(run_saved("mindspore", model, feed_sets, tmp_path)):
        check(got, ort_run(model, feed_sets[k]), f"mindir {name} shape {k}")


# ---- memory: temporaries of broadcasting and transposing kernels are reused ------------------------
MEMORY_PROBE = """
import sys
import numpy as np
from slimm.convert.targets.mindspore.runtime import load_mindir
from pathlib import Path

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024

run = load_mindir(Path(sys.argv[1]), "m")
heads = int(sys.argv[2])
def feeds(p):
    r = np.random.default_rng(p)
    return [r.standard_normal((heads, p, p)).astype(np.float32), r.random((p, p)) > 0.5,
            r.standard_normal(p).astype(np.float32)]
run(*feeds(64))  # compiled at small sizes first
big = feeds(1024)
before = rss()
run(*big)
print((rss() - before) / big[0].nbytes)
"""


def test_broadcasts_and_transposes_do_not_hold_their_temporaries(tmp_path):
    """MindSpore's CPU kernels that broadcast a non-scalar operand (Add, Mul, Where, Select) or
    transpose keep a full-size temporary per node to the end of the graph: the vision tower of a
    448x448 image grew past 20 GB that way. The generated code broadcasts explicitly and permutes with
    mint.permute, so memory is reused: 8 blocks of (Where, Add of a row, Transpose, Mul) grew by ~6
    activations (~100 before)."""
    import onnx
    from convert_cases import opset_model
    from onnx import TensorProto, helper, numpy_helper

    heads, blocks = 4, 8
    nodes, x = [], "x"
    for i in range(blocks):
        nodes += [
            helper.make_node("Where", ["mask", "neg", x], [f"w{i}"]),
            helper.make_node("Add", [f"w{i}", "bias"], [f"a{i}"]),
            helper.make_node("Transpose", [f"a{i}"], [f"t{i}"], perm=[0, 2, 1]),
            helper.make_node("Mul", [f"t{i}", "half"], [f"x{i}"]),
        ]
        x = f"x{i}"
    g = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [heads, "p", "p"]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["p", "p"]),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, ["p"]),
        ],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [heads, "p", "p"])],
        [
            numpy_helper.from_array(np.array(-1e9, np.float32), "neg"),
            numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        ],
    )
    model = opset_model(g)
    onnx.save(model, str(tmp_path / "m.onnx"))
    src, prog = generate_source(tmp_path / "m.onnx", "mindspore")
    (tmp_path / "gen_m.py").write_text(src)
    assert [v.name for v in prog.inputs] == ["x", "mask", "bias"]
    inputs = [("x", "float32", [None] * 3), ("mask", "bool", [None] * 2), ("bias", "float32", [None])]
    TARGET.save(import_generated(tmp_path / "gen_m.py"), prog.weights, inputs, tmp_path, "m")
    proc = run_python(MEMORY_PROBE, str(tmp_path), str(heads), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = float(proc.stdout.strip().splitlines()[-1])
    assert growth < 3 * blocks, f"resident memory grew by {growth:.1f} activations over {blocks} blocks"
