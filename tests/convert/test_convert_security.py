"""Converting an ONNX file runs none of its text: node, tensor, input, output and file names, doc
strings and attribute values reach the generated code only as sanitised identifiers or literals.
Every target converts a graph full of hostile names (the payload would create a file), and the
result still matches ONNX Runtime; attributes of the wrong type are refused."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from convert_cases import opset_model  # noqa: E402
from convert_helpers import check, generated, ort_run, run_saved  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from slimm.convert import TARGETS, get_target  # noqa: E402
from slimm.convert.ir import ConversionError  # noqa: E402
from slimm.frameworks import FRAMEWORKS  # noqa: E402


def payload(marker) -> str:
    """Text that creates `marker` if it ever runs as Python, whatever it lands in."""
    code = f"open({str(marker)!r}, 'w').close()"
    return f"\n{code}\n#'''\"\"\"\n{code}\n\\\n\r{code}\r\n"


def hostile_model(marker):
    p = payload(marker)
    long = "L" * 300
    names = {
        "a": "in" + p,  # an input
        "w": "w",  # a stored weight (MatMul of a weight: JAX keeps a transposed copy)
        "w_t": "w_t",  # what a naive transposed copy of a weight called `w` would be named
        "fi": "ﬁ",  # non-ASCII; NFKC makes it the identifier `fi`
        "fi2": "fi",
        "mm": "class",  # Python keywords
        "t1": "def" + p,
        "t2": long + "1",  # the same after shortening
        "o1": long + "2",
        "o2": "ü\\'\"\u2028import os",
        "neg": "-inf" + p,
        "wc": 'w"""' + p,
    }
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 24)).astype(np.float32), names["w"])
    w_t = numpy_helper.from_array(rng.standard_normal((4, 1, 24)).astype(np.float32), names["w_t"])
    neg = numpy_helper.from_array(np.array(-np.inf, np.float32), names["neg"])
    n = names
    nodes = [
        helper.make_node("MatMul", [n["a"], n["w"]], [n["mm"]], name="mm" + p, doc_string=p),
        helper.make_node("Identity", [n["w"]], [n["wc"]], name="w" + p),  # w read as it is too
        helper.make_node("Add", [n["mm"], n["fi"]], [n["t1"]], name="' + " + p),
        helper.make_node("Add", [n["t1"], n["fi2"]], [n["t2"]], name=p),
        helper.make_node("Max", [n["t2"], n["neg"]], [n["o1"]], name="\\" + p),  # a -inf constant
        helper.make_node("Add", [n["o1"], n["w_t"]], [n["o2"]], name="ü" * 500),
    ]
    inputs = [
        helper.make_tensor_value_info(n["a"], TensorProto.FLOAT, ["batch", 16]),
        helper.make_tensor_value_info(n["fi"], TensorProto.FLOAT, ["batch", 24]),
        helper.make_tensor_value_info(n["fi2"], TensorProto.FLOAT, ["batch", 24]),
    ]
    outputs = [
        helper.make_tensor_value_info(n["o1"], TensorProto.FLOAT, None),
        helper.make_tensor_value_info(n["o2"], TensorProto.FLOAT, None),
        helper.make_tensor_value_info(n["wc"], TensorProto.FLOAT, None),
    ]
    graph = helper.make_graph(nodes, "g" + p, inputs, outputs, [w, w_t, neg], doc_string=p)
    model = opset_model(graph, doc_string=p)
    feeds = {
        n["a"]: rng.standard_normal((2, 16)).astype(np.float32),
        n["fi"]: rng.standard_normal((2, 24)).astype(np.float32),
        n["fi2"]: rng.standard_normal((2, 24)).astype(np.float32),
    }
    return model, feeds


@pytest.mark.parametrize("target", TARGETS)
def test_hostile_names_convert_run_nothing_and_still_match(target, tmp_path):
    pytest.importorskip(FRAMEWORKS[target].module)
    marker = tmp_path / "PWNED"
    model, feeds = hostile_model(marker)
    ref = ort_run(model, feeds)
    name = 'part"""' + payload(marker)  # the part's name, as a manifest could give it
    module, prog = generated(target, model, tmp_path, name=name)
    assert not marker.exists()
    got = get_target(target).runner(module, prog.weights)(*[feeds[v.name] for v in prog.inputs])
    check(got, ref, f"{target} eager")
    (saved,) = run_saved(target, model, [feeds], tmp_path, tag="saved", name=name)
    check(saved, ref, f"{target} saved")
    assert not marker.exists()
    assert len({v.var for v in prog.inputs}) == 3  # `ﬁ` and `fi`: two variables


@pytest.mark.parametrize(
    "attrs, message",
    [
        ({"axis": "0], axis=0); open('PWNED', 'w').close(); ([0"}, "attribute 'axis' has the wrong type"),
        ({"axis": 0, "code": "open('PWNED', 'w').close()"}, "attribute 'code' is not defined"),
    ],
    ids=["string-for-int", "unknown"],
)
def test_attributes_of_the_wrong_type_or_unknown_are_refused(attrs, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Concat", ["x", "x"], ["y"], **attrs)
    model = opset_model(helper.make_graph([node], "g", [x], [y]))
    for target in TARGETS:
        if FRAMEWORKS[target].module and __import__("importlib").util.find_spec(FRAMEWORKS[target].module):
            with pytest.raises(ConversionError, match=message):
                generated(target, model, tmp_path)
    assert not (tmp_path / "PWNED").exists()
