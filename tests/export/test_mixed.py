"""Mixed-precision exports (int4+w8a8, int8+w8a8): int4 / int8 weights where decode reads them (A, F),
w8a8 for the vision tower (B) and for F's prefill variant, which the ONNX backend runs for prompts.

Each phase must run exactly the file it names: the prompt step's logits equal w8a8's F on the same
feeds and a decode step's equal int4's F (both bit for bit: the files are quantized the same way from
the same fp32 export and run with the same session options), the visual tokens equal w8a8's B. The
closeness to fp32 is test_quantize.py's test_logits_close_to_fp32.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from prompts import CASES, edit_json, make_inputs, rel_err

pytest.importorskip("onnxruntime")

from slimm.backends.onnx import OnnxBackend  # noqa: E402
from slimm.errors import CheckpointError, InputError  # noqa: E402


def f_steps(backend, inputs, steps: int) -> list[tuple[dict, np.ndarray]]:
    """(feeds, logits) of every part-F call while generating `steps` tokens greedily. The feeds are
    copied when made: the cache feeds of whole rows are views of the pool, which later steps write."""
    calls = []
    real = backend.run_part

    def record(part, feeds):
        out = real(part, feeds)
        if part == "F":
            calls.append(({k: np.array(v) for k, v in feeds.items()}, np.array(out[0])))
        return out

    backend.run_part = record
    backend.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=[])
    return calls


def test_prompts_run_the_w8a8_prefill_file_and_decode_steps_run_int4s(quantized):
    mixed = OnnxBackend(quantized("int4+w8a8"), device="cpu")
    w8a8 = OnnxBackend(quantized("w8a8"), device="cpu").sessions["F"]
    int4 = OnnxBackend(quantized("int4"), device="cpu").sessions["F"]
    inputs = make_inputs(mixed.config, CASES["batch2"])
    calls = f_steps(mixed, inputs, 4)
    assert [feeds["inputs_embeds"].shape[1] > 1 for feeds, _ in calls] == [True, False, False, False]
    for i, (feeds, logits) in enumerate(calls):
        want, other = (w8a8, int4) if i == 0 else (int4, w8a8)
        np.testing.assert_array_equal(logits, want.run(["logits"], feeds)[0], err_msg=f"F call {i}")
        # the two files really differ on these feeds: the comparison above tells which one ran
        assert rel_err(other.run(["logits"], feeds)[0], logits) > 1e-3, f"F call {i}"


def test_mixed_vision_tokens_and_int8_prefill_equal_w8a8s(quantized):
    """B is w8a8's file: the same visual tokens. int8+w8a8's A is w8a8's too (the 8-bit gather), so
    its whole prefill, prompt to logits, is w8a8's bit for bit."""
    w8a8 = OnnxBackend(quantized("w8a8"), device="cpu")
    inputs = make_inputs(w8a8.config, CASES["batch2"])
    ref_tokens, _ = w8a8.encode_visual(inputs["pixel_values"], inputs["image_grid_thw"])
    ref_logits = w8a8.prefill(inputs, 64)
    for precision in ("int4+w8a8", "int8+w8a8"):
        mixed = OnnxBackend(quantized(precision), device="cpu")
        tokens, _ = mixed.encode_visual(inputs["pixel_values"], inputs["image_grid_thw"])
        np.testing.assert_array_equal(tokens, ref_tokens, err_msg=precision)
        if precision == "int8+w8a8":
            np.testing.assert_array_equal(mixed.prefill(inputs, 64), ref_logits)


@pytest.mark.parametrize("wrapper", ["numpy", "torch"])
def test_wrapper_backends_run_the_prefill_variant_too(quantized, wrapper):
    pytest.importorskip(wrapper)
    ref = OnnxBackend(quantized("int4+w8a8"), device="cpu")
    got = OnnxBackend(quantized("int4+w8a8"), device="cpu", wrapper=wrapper)
    assert sorted(got.wrapped) == ["A", "B", "C", "D", "E", "F", "F.prefill"]
    inputs = make_inputs(ref.config, CASES["image"])
    kw = dict(max_new_tokens=4, output_logits=True, return_dict_in_generate=True, eos_token_id=[])
    a, b = ref.generate(**inputs, **kw), got.generate(**inputs, **kw)
    np.testing.assert_array_equal(b.sequences, a.sequences)
    for x, y in zip(b.logits, a.logits, strict=True):
        np.testing.assert_array_equal(got.to_numpy(x), y)


def test_mixed_manifest_files_and_round_trip(exported, quantized):
    import onnx

    from slimm.export.manifest import Manifest

    out = quantized("int4+w8a8")
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["precision"] == "int4+w8a8"
    q = raw["quantization"]
    assert q["precisions"] == {"A": "int4", "B": "w8a8", "F": "int4", "F.prefill": "w8a8"}
    assert q["bits"] == 4 and q["weight_range_bits"] == 7 and q["block_size"] == 32
    layers = raw["model"]["text"]["num_hidden_layers"]
    assert (
        q["rewritten"]["F"]["MatMulNBits"] == q["rewritten"]["F.prefill"]["MatMulInteger"] == 5 * layers + 1
    )
    assert q["rewritten"]["B"]["MatMulInteger"] > 0 and q["rewritten"]["A"]["GatherBlockQuantized"] == 1
    pre = raw["parts"]["F"]["prefill"]
    assert pre == {"file": "SliMM_F.prefill.onnx", "data": "SliMM_F.prefill.onnx.data"}
    # int8 weights against int4's (both with the same fp32 norms and biases beside them)
    assert (out / pre["data"]).stat().st_size > 1.3 * (out / raw["parts"]["F"]["data"]).stat().st_size
    m = Manifest.read(out)
    assert m.parts["F"].prefill.file == pre["file"] and m.quantization.precisions == q["precisions"]
    assert m.to_dict() == raw and list(m.to_dict()) == list(raw)
    # an export without the variant reads and writes as before: no prefill entry, no key
    plain = Manifest.read(quantized("int4"))
    assert plain.parts["F"].prefill is None and "prefill" not in plain.to_dict()["parts"]["F"]
    # the prefill file is part F of this export with F's inputs and outputs
    models = [onnx.load(str(out / name), load_external_data=False) for name in ("SliMM_F.onnx", pre["file"])]
    for g in models:  # quantize_dynamic adds its own onnx.infer entry beside the stamp
        meta = {p.key: p.value for p in g.metadata_props}
        assert meta["slimm.part"] == "F" and meta["slimm.export_id"] == raw["export_id"]
    for io in ("input", "output"):
        names = [[t.name for t in getattr(g.graph, io)] for g in models]
        assert names[0] == names[1], io
    ops = [{n.op_type for n in g.graph.node} for g in models]
    assert "MatMulNBits" in ops[0] - ops[1] and "MatMulInteger" in ops[1] - ops[0]


@pytest.mark.parametrize(
    "part, prefill, message",
    [
        ("F", "SliMM_F.prefill.onnx", "entry parts.F.prefill is not an object naming a file"),
        ("F", {"data": "x.data"}, "entry parts.F.prefill is not an object naming a file"),
        ("F", {"file": "../F.onnx"}, "entry parts.F.prefill.file names '../F.onnx', which is not a plain"),
        ("F", {"file": "SliMM_F.prefill.onnx", "data": "/x"}, "entry parts.F.prefill.data names '/x'"),
        ("F", {"file": "SliMM_F.prefill.onnx", "contrib_ops": "Op"}, "entry parts.F.prefill.contrib_ops is"),
        ("B", {"file": "SliMM_F.prefill.onnx"}, "entry parts.B.prefill: only part F has a prefill variant"),
    ],
)
def test_malformed_prefill_entry(quantized, tmp_path, part, prefill, message):
    d = shutil.copytree(quantized("int4+w8a8"), tmp_path / "e")
    edit_json(d / "manifest.json", lambda m: m["parts"][part].update(prefill=prefill))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        OnnxBackend(d, device="cpu")


def test_missing_or_foreign_prefill_file(quantized, tmp_path):
    d = shutil.copytree(quantized("int4+w8a8"), tmp_path / "e")
    (d / "SliMM_F.prefill.onnx.data").unlink()
    with pytest.raises(
        CheckpointError, match=r"SliMM_F.prefill.onnx.data: weights of part F's prefill variant"
    ):
        OnnxBackend(d, device="cpu")
    (d / "SliMM_F.prefill.onnx").unlink()
    with pytest.raises(
        CheckpointError, match=r"SliMM_F.prefill.onnx: part F's prefill variant \(.*\) is missing"
    ):
        OnnxBackend(d, device="cpu")
    edit_json(d / "manifest.json", lambda m: m["parts"]["F"].update(prefill={"file": "SliMM_B.onnx"}))
    with pytest.raises(CheckpointError, match="SliMM_B.onnx: this file is part 'B'"):
        OnnxBackend(d, device="cpu")


def test_convert_refuses_a_mixed_export(quantized, tmp_path):
    from slimm.convert.driver import convert_export
    from slimm.convert.ir import ConversionError

    with pytest.raises(ConversionError, match=re.escape("a int4+w8a8 export runs on ONNX Runtime only")):
        convert_export(quantized("int4+w8a8"), "jax", tmp_path / "jax", progress=False)
    assert not (tmp_path / "jax").exists()


@pytest.mark.parametrize("precision", ["w8a8+int4", "fp16+w8a8", "int2+w8a8"])
def test_bad_mixed_precisions_name_the_choices(exported, tmp_path, capsys, precision):
    from slimm.cli import main
    from slimm.export.quantize import quantize_export

    hint = "a mixed precision is decode's weight-only precision + w8a8: int4+w8a8 or int8+w8a8"
    assert main(["export", "--out", str(tmp_path / "x"), "--precision", precision]) == 2
    err = capsys.readouterr().err
    assert f"precision {precision!r} is not one of fp32, fp16, int8, int4, w8a8, int4+w8a8, int8+w8a8" in err
    assert hint in err
    with pytest.raises(InputError, match=re.escape(hint)):
        quantize_export(exported("plain"), tmp_path / "q", precision)
    assert not (tmp_path / "x").exists() and not (tmp_path / "q").exists()


def test_block_size_applies_to_the_mixed_precisions(tmp_path, capsys):
    """--block-size sets the int4 / int8 half's blocks: accepted, and checked as int4's is."""
    from slimm.cli import main
    from slimm.export.export import check_export_settings

    check_export_settings("int4+w8a8", block_size=64)
    assert (
        main(["export", "--out", str(tmp_path / "x"), "--precision", "int8+w8a8", "--block-size", "48"]) == 2
    )
    assert "block size 48 must be a power of two" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
