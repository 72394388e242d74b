"""The one ONNX Runtime session builder: OnnxBackend and its X-ort forms open one session per
part, with the options they were given (the wrappers' sessions come from the same builder)."""

from __future__ import annotations

import pytest

from slimm.errors import InputError

ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("wrapper", [None, "numpy", "torch"])
def test_one_session_per_part_with_the_given_options(exported, monkeypatch, wrapper):
    if wrapper == "torch":
        pytest.importorskip("torch")
    from slimm.backends.onnx import OnnxBackend
    from slimm.export.manifest import PARTS

    made = []
    real = ort.InferenceSession

    def counting(*args, **kwargs):
        made.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    backend = OnnxBackend(exported("plain"), device="cpu", threads=1, opt_level="basic", wrapper=wrapper)
    assert len(made) == len(PARTS)
    for part in PARTS:
        so = backend.sessions[part].get_session_options()
        assert str(so.graph_optimization_level).endswith("ORT_ENABLE_BASIC")
        assert so.intra_op_num_threads == 1
        # activations from the process's one CPU arena, not an arena per part (share_cpu_arena)
        assert so.get_session_config_entry("session.use_env_allocators") == "1"
        if wrapper:
            assert backend.wrapped[part].session is backend.sessions[part]


def test_a_mixed_export_opens_its_prefill_file_with_the_same_options(quantized, monkeypatch):
    from pathlib import Path

    from slimm.backends.onnx import OnnxBackend
    from slimm.export.manifest import PARTS

    made = []
    real = ort.InferenceSession

    def counting(*args, **kwargs):
        made.append(Path(args[0]).name)
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    backend = OnnxBackend(quantized("int4+w8a8"), device="cpu", threads=1, opt_level="basic")
    assert made == [*(f"SliMM_{p}.onnx" for p in PARTS), "SliMM_F.prefill.onnx"]
    so = backend.sessions["F.prefill"].get_session_options()
    assert str(so.graph_optimization_level).endswith("ORT_ENABLE_BASIC") and so.intra_op_num_threads == 1


def test_bad_session_options_are_input_errors(exported):
    from slimm.backends.onnx import OnnxBackend

    with pytest.raises(InputError, match=r"option threads must be an int from 0 .* to 1024"):
        OnnxBackend(exported("plain"), threads=10**9)
    with pytest.raises(
        InputError, match=r"option opt_level must be one of disable, basic, extended, layout, all"
    ):
        OnnxBackend(exported("plain"), opt_level="max", wrapper="numpy")
