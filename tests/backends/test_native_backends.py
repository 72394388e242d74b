"""Converted backends (jax, paddle, mindspore) end to end: the same greedy tokens as torch with
logits within 1e-4, every variant; the decode step compiled once; converted directories checked."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from prompts import CASES, edit_json, make_inputs, rel_err, run_python

pytest.importorskip("onnxruntime")

from slimm.backends.torch import TorchBackend  # noqa: E402
from slimm.config import VARIANTS  # noqa: E402
from slimm.errors import CheckpointError  # noqa: E402
from slimm.frameworks import FRAMEWORKS, TARGETS  # noqa: E402


def load(target, path):
    from slimm import load as slimm_load

    return slimm_load(path, backend=target)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_native_backend_matches_torch(converted, torch_model, target, variant):
    backend = load(target, converted(target, variant))
    model = torch_model(variant)
    # every case once across the variants, the vision-specific ones on the variants they exercise
    cases = {
        "plain": ("image", "text", "batch2", "video"),
        "v1": ("two_images", "batch2"),
        "midlayers": ("image",),
        "efficient": ("image", "video"),
    }[variant]
    for case in cases:
        inputs = make_inputs(model.config, CASES[case], seed=7)
        kw = dict(max_new_tokens=32, output_logits=True, return_dict_in_generate=True, eos_token_id=[])
        ref = TorchBackend(model).generate(**inputs, **kw)
        got = backend.generate(**inputs, **kw)
        np.testing.assert_array_equal(got.sequences, ref.sequences, err_msg=f"{target} {variant} {case}")
        err = max(rel_err(a, b) for a, b in zip(got.logits, ref.logits, strict=True))
        assert err < 1e-4, f"{target} {variant} {case}: logits relative error {err:.2e}"


def test_jax_decode_step_compiles_once(converted, torch_model):
    backend = load("jax", converted("jax", "v1"))
    inputs = make_inputs(torch_model("v1").config, CASES["image"], seed=8)
    backend.generate(**inputs, max_new_tokens=12, eos_token_id=[])
    f = backend.parts["F"]
    assert f.compilations == 2  # one prefill shape, one decode shape for all 11 steps
    # a second prompt of another length in the same bucket compiles nothing new
    inputs = make_inputs(torch_model("v1").config, [[("image", (1, 4, 6)), 9]], seed=9)
    backend.generate(**inputs, max_new_tokens=12, eos_token_id=[])
    assert f.compilations == 2


def test_converted_dir_from_another_framework_is_refused(converted):
    pytest.importorskip("paddle")
    with pytest.raises(CheckpointError, match="format is 'slimm-jax', expected 'slimm-paddle'"):
        load("paddle", converted("jax"))


def test_converted_with_another_framework_version_is_refused(converted, tmp_path):
    d = shutil.copytree(converted("jax"), tmp_path / "c")
    edit_json(d / "manifest.json", framework_version="0.0.1")
    with pytest.raises(CheckpointError, match="converted with jax 0.0.1"):
        load("jax", d)


def test_corrupt_or_missing_artifact(converted, tmp_path):
    d = shutil.copytree(converted("jax"), tmp_path / "c")
    (d / "SliMM_F.jaxexport").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="SliMM_F.jaxexport"):
        load("jax", d)
    (d / "SliMM_F.jaxexport").unlink()
    with pytest.raises(CheckpointError, match="SliMM_F.jaxexport"):
        load("jax", d)


def test_converted_dir_runs_without_onnx_or_torch(converted):
    """A converted directory needs its framework alone: onnx, onnxruntime and torch are made
    unimportable in a fresh process before loading and generating."""
    d = converted("jax")
    code = (
        "import sys\n"
        "for m in ('onnx', 'onnxruntime', 'torch'):\n"
        "    sys.modules[m] = None\n"
        "import numpy as np, slimm\n"
        f"b = slimm.load({str(d)!r}, backend='jax')\n"
        "out = b.generate(input_ids=np.array([[1, 2, 3]]), max_new_tokens=3, eos_token_id=[])\n"
        "print(out.shape)\n"
    )
    res = run_python(code)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "(1, 6)" in res.stdout


def test_validate_names_the_first_diverging_node(exported, tmp_path, monkeypatch):
    """Break one JAX handler on purpose: --validate must point at the node it produced."""
    pytest.importorskip("jax")
    from slimm.convert.driver import convert_export
    from slimm.convert.ir import ConversionError
    from slimm.convert.targets.jax.registry import REGISTRY

    versions = REGISTRY.handlers["Sigmoid"]
    real = versions[0][1]

    def broken(e, node):
        real(e, node)
        e.lines[-1] = e.lines[-1] + " * 1.01"

    monkeypatch.setitem(REGISTRY.handlers, "Sigmoid", [(versions[0][0], broken)])
    with pytest.raises(ConversionError, match=r"first divergence at node .*\(Sigmoid\).*tolerance"):
        convert_export(exported("plain"), "jax", tmp_path / "bad", validate=True, progress=False)


def test_operators_doc_is_generated_from_the_registries():
    from pathlib import Path

    for target in TARGETS:
        pytest.importorskip(FRAMEWORKS[target].module)
    from slimm.convert.optable import operators_markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "operators.md"
    assert doc.read_text() == operators_markdown(), (
        "docs/operators.md is stale: run `slimm operators > docs/operators.md`"
    )
