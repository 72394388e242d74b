"""JAX target end to end: every part of every variant as a saved jax.export artifact, reloaded and
run at two shapes against ONNX Runtime (<= 1e-5 relative); converter errors name their cause."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")
ort = pytest.importorskip("onnxruntime")

from slimm.convert.convert import SAMPLE_SIZES, sample_inputs  # noqa: E402
from slimm.convert.jax import JaxPart  # noqa: E402
from slimm.export.manifest import PARTS, read_manifest  # noqa: E402

VARIANTS = ("plain", "v1", "midlayers", "efficient")


@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_parts_match_onnxruntime_at_two_shapes(exported, converted, variant, monkeypatch):
    onnx_dir, out = exported(variant), converted("jax", variant)
    manifest = read_manifest(onnx_dir)
    for part in PARTS:
        entry = manifest["parts"][part]
        sess = ort.InferenceSession(str(onnx_dir / entry["file"]), providers=["CPUExecutionProvider"])
        run = JaxPart(out, entry["file"].removesuffix(".onnx"))
        order = [i.name for i in sess.get_inputs()]
        for sizes in (
            {"batch": 1, "seq": 4, "capacity": 7, "tokens": 6},
            {"batch": 2, "seq": 9, "capacity": 12, "tokens": 4},
        ):
            monkeypatch.setattr("slimm.convert.convert.SAMPLE_SIZES", {**SAMPLE_SIZES, **sizes})
            feeds = sample_inputs(manifest, part, seed=sizes["seq"])
            ref = sess.run(None, feeds)
            got = run(*[feeds[n] for n in order])
            assert len(got) == len(ref)
            for g, r, o in zip(got, ref, entry["outputs"], strict=True):
                g = np.asarray(g)
                assert g.shape == r.shape, f"{variant} {part} {o['name']}"
                if r.dtype.kind == "f":
                    err = np.abs(g - r).max() / max(np.abs(r).max(), 1e-30)
                    assert err <= 1e-5, f"{variant} {part} {o['name']}: {err:.2e}"
                else:
                    np.testing.assert_array_equal(g, r)


def test_corrupt_onnx_file_is_a_clear_error(tmp_path):
    from slimm.convert import generate_source
    from slimm.convert.graph import ConversionError

    bad = tmp_path / "SliMM_F.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf" * 3)
    with pytest.raises(ConversionError, match="SliMM_F.onnx: not a readable ONNX model"):
        generate_source(bad, "jax")


def test_framework_not_installed_is_a_clear_error(exported, tmp_path, monkeypatch):
    import importlib

    from slimm.convert.convert import convert_export
    from slimm.errors import BackendUnavailable

    real = importlib.import_module

    def no_paddle(name, *args, **kwargs):
        if name == "slimm.convert.paddle" or name.startswith("paddle"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_paddle)
    with pytest.raises(BackendUnavailable, match="paddle"):
        convert_export(exported("plain"), "paddle", tmp_path / "p", progress=False)


def test_unknown_target_is_a_clear_error(exported, tmp_path):
    from slimm.convert.convert import convert_export
    from slimm.convert.graph import ConversionError

    with pytest.raises(ConversionError, match="unknown target 'tensorflow'"):
        convert_export(exported("plain"), "tensorflow", tmp_path / "t", progress=False)
