"""Per-op conformance: every registered handler of every target, on one-node ONNX graphs, against
ONNX Runtime (fp32: max relative error <= 1e-5; ints and bools exact).

A case lists its inputs: arrays given as graph inputs (run-time tensors) or, with `static=`, as
initializers the converter folds (shapes, axes, bounds). Some cases run the converter on a tiny
graph of a few nodes where the op only makes sense after shape folding (Shape -> Reshape).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


from convert_cases import CASES, Case, f32, opset_model, shape_fold_model  # noqa: E402
from convert_helpers import check, run_target  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

from slimm.convert import TARGETS, generate_source, get_target  # noqa: E402
from slimm.frameworks import FRAMEWORKS  # noqa: E402


def installed_targets():
    return [t for t in TARGETS if importlib.util.find_spec(FRAMEWORKS[t].module)]


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_op_matches_onnxruntime(target, case, tmp_path):
    pytest.importorskip(FRAMEWORKS[target].module)
    try:
        tgt = get_target(target)
    except ImportError as e:  # a target package not written yet
        pytest.skip(f"target {target} unavailable: {e}")
    if case.op not in tgt.registry.handlers:
        pytest.skip(f"{target} has no handler for {case.op}")
    model = case.model()
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, case.feeds()
    )
    check(run_target(target, model, case.feeds(), tmp_path), ref, f"{target} {case.name}")


@pytest.mark.parametrize("target", list(TARGETS))
def test_shape_arithmetic_folds_to_runtime_sizes(target, tmp_path):
    pytest.importorskip(FRAMEWORKS[target].module)
    model = shape_fold_model()
    for b, s in ((2, 6), (3, 2)):  # two shapes through the same generated code
        x = f32(b, s, 6)
        ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x}
        )
        check(run_target(target, model, {"x": x}, tmp_path), ref, f"{target} fold {b}x{s}")


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_registered_handler_has_a_case(target):
    pytest.importorskip(FRAMEWORKS[target].module)
    covered = {c.op for c in CASES} | {"Shape"}
    missing = sorted(set(get_target(target).registry.handlers) - covered)
    assert not missing, f"{target}: handlers without a conformance case: {missing}"


def test_unknown_op_is_a_clear_error(tmp_path):
    from slimm.convert.ir import ConversionError

    case = Case("Celu", [f32(2, 3)])
    path = tmp_path / "m.onnx"
    onnx.save(case.model(), str(path))
    with pytest.raises(ConversionError, match="no converter for op Celu at opset 20.*node"):
        generate_source(path, "jax")


def test_registering_twice_raises():
    from slimm.convert.registry import Registry

    reg = Registry("x")
    reg.register("Add", since=7)(lambda e, n: None)
    with pytest.raises(ValueError, match="twice"):
        reg.register("Add", since=7)(lambda e, n: None)


def test_floor_lookup_picks_the_newest_version_not_above_the_opset():
    from slimm.convert.ir import ConversionError
    from slimm.convert.registry import Registry

    reg = Registry("x")

    def v1(e, n):
        return None

    def v13(e, n):
        return None

    reg.register("Op", since=1)(v1)
    reg.register("Op", since=13)(v13)
    assert reg.lookup("Op", 12, "n") is v1
    assert reg.lookup("Op", 20, "n") is v13
    reg2 = Registry("y")
    reg2.register("Op", since=18)(v13)
    with pytest.raises(ConversionError, match="handlers exist from opset 18"):
        reg2.lookup("Op", 17, "n")


def test_a_conversion_leaves_no_state_on_the_shared_target(tmp_path):
    """Per-module state (MindSpore's constants) lives in a target instance of one conversion: a
    conversion that fails half-way leaves nothing on the shared TARGET for the next one."""
    pytest.importorskip("mindspore")
    from slimm.convert.ir import ConversionError

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["a", 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Gather", ["x", "i"], ["g"], axis=1),  # a static index: a constant
        helper.make_node("Celu", ["g"], ["y"]),  # no handler: the conversion stops here
    ]
    idx = numpy_helper.from_array(np.array([3, 1], np.int64), "i")
    model = opset_model(helper.make_graph(nodes, "g", [x], [y], [idx]))
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(ConversionError, match="Celu"):
        generate_source(tmp_path / "m.onnx", "mindspore")
    assert get_target("mindspore")._consts == {}
