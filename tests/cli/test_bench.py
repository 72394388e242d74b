"""`slimm bench`: bad input is a clear error, a missing framework is a skipped row, the report groups
skips and checks the goals, and a tiny run goes end to end (no timing is asserted: speed is measured
by the benchmark itself, not by tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench, report
from slimm.cli import main as slimm_main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backends", "onnx,tensorflow"], "unknown backend tensorflow"),
        (["--precision", "int3"], "unknown precision int3"),
        (["--size", "7b"], "invalid choice: '7b'"),
        (["--image-size", "big"], "is not HEIGHTxWIDTH"),
        (["--decode-steps", "0"], "must be at least 1"),
        (["--block-size", "48"], "block size 48 must be a power of two >= 16"),
    ],
)
def test_bad_options_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_slimm_bench_is_wired_into_the_cli(capsys):
    with pytest.raises(SystemExit) as e:
        slimm_main(["bench", "--help"])
    assert e.value.code == 0
    assert "--backends" in capsys.readouterr().out


def test_missing_framework_is_a_skipped_row_with_its_reason(monkeypatch):
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(
        bench.importlib.util, "find_spec", lambda name: None if name == "mindspore" else real(name)
    )
    assert bench.skip_reason("mindspore", "fp32", "plain") == "mindspore is not installed"
    assert bench.skip_reason("onnx", "fp32", "plain") is None
    assert "ONNX Runtime only" in bench.skip_reason("jax", "int4", "plain")
    assert "dynamic quantization (MatMulInteger): ONNX Runtime only" in bench.skip_reason(
        "paddle", "w8a8", "plain"
    )
    assert bench.skip_reason("onnx", "w8a8", "plain") is None
    assert "(MatMulNBits and MatMulInteger): ONNX Runtime only" in bench.skip_reason(
        "jax", "int4+w8a8", "plain"
    )
    assert bench.skip_reason("onnx", "int4+w8a8", "plain") is None
    assert "DeepStack" in bench.skip_reason("transformers", "fp32", "efficient")


def _row(backend, precision, decode_tps, weights=1e9, peak=1.2e9, vision_s=1.0, prefill_tps=100.0):
    return {
        "backend": backend,
        "precision": precision,
        "status": "ok",
        "load_s": 1.0,
        "compile_s": 0.0,
        "weight_bytes": weights,
        "peak_rss_bytes": peak,
        "tokens": [1, 2, 3],
        "decode": {"tokens_per_s": decode_tps, "median_s": 1 / decode_tps},
        "prefill": {"tokens_per_s": prefill_tps},
        "vision": {"median_s": vision_s},
        "ttft": {"median_s": 2.0},
    }


def test_report_groups_skips_notes_failures_and_checks_goals():
    meta = {
        "variant": "plain",
        "size": "0.5b",
        "image_size": [448, 448],
        "prompt_tokens": 256,
        "decode_steps": 32,
        "repeats": 2,
        "rounds": 1,
        "machine": "test",
        "versions": {},
        "read_bandwidth_bytes_per_s": 30e9,
    }
    reason = "int4 is ONNX Runtime weight-only quantization (MatMulNBits): ONNX Runtime only"
    results = [
        _row("transformers", "fp32", 10.0, vision_s=8.0),
        _row("onnx", "fp32", 30.0, vision_s=4.0, prefill_tps=200.0),
        {"backend": "paddle", "precision": "fp32", "status": "skipped", "reason": "paddle is not installed"},
        {
            **_row("mindspore", "fp32", 12.0, peak=3e9),
            "status": "failed",
            "reason": "stopped at the memory limit",
        },
        _row("onnx", "int4", 90.0),
        _row("onnx", "w8a8", 40.0, vision_s=6.0, prefill_tps=300.0),
        {"backend": "torch", "precision": "int4", "status": "skipped", "reason": reason},
        {"backend": "jax", "precision": "int4", "status": "skipped", "reason": reason},
    ]
    report.compare(results)
    text = report.markdown(meta, results)
    assert "| torch, jax | int4 | skipped: " + reason in text  # one line for both
    assert "| paddle | fp32 | skipped: paddle is not installed" in text
    assert "- mindspore fp32: failed: stopped at the memory limit" in text
    goals = {g["goal"]: g for g in report.goals(results)}
    assert goals["ONNX Runtime fp32 decode vs transformers"]["ratio"] == pytest.approx(3.0)
    assert goals["ONNX Runtime fp32 decode vs transformers"]["met"]
    assert not goals["ONNX Runtime int4 decode vs transformers"]["met"]  # 9x < 10x
    assert goals["ONNX Runtime vision encode time vs transformers"]["ratio"] == pytest.approx(0.5)
    assert goals["ONNX Runtime w8a8 vision encode time vs transformers"]["ratio"] == pytest.approx(0.75)
    assert goals["ONNX Runtime w8a8 prefill tok/s vs transformers"]["ratio"] == pytest.approx(3.0)
    assert not goals["ONNX Runtime w8a8 decode vs transformers"]["met"]  # 4x < 6x
    assert "ONNX Runtime int8 decode vs transformers" not in goals  # no int8 row: no goal line
    assert "MindSpore decode vs ONNX Runtime fp32" in goals  # a killed row still counts what it measured
    assert "mindspore fp32 peak memory vs weight bytes" not in goals  # but not its peak memory
    assert goals["onnx fp32 peak memory vs weight bytes"]["met"]  # 1.2 GB for 1 GB of weights


def test_memory_goal_is_not_judged_where_the_weights_are_too_small_to_matter():
    """The tiny model's few MB of weights next to a framework's own resident memory: no memory goal."""
    results = [_row("onnx", "fp32", 30.0, weights=8e6, peak=52e6), _row("torch", "fp32", 20.0)]
    report.compare(results)
    judged = {g["goal"] for g in report.goals(results)}
    assert "onnx fp32 peak memory vs weight bytes" not in judged
    assert "torch fp32 peak memory vs weight bytes" in judged


def test_the_roofline_bytes_of_a_checkpoint_are_its_exports(demo_dir, exported):
    """A torch-only run counts a decode step's weight bytes from the checkpoint's shapes, without an
    export: the same count as part F's initializers (a few bytes of F's own constants apart)."""
    from_export = bench.decode_bytes(exported("plain"))
    from_ckpt = bench.checkpoint_decode_bytes(demo_dir("plain"), "fp32")
    assert from_ckpt == pytest.approx(from_export, rel=1e-5)
    assert bench.checkpoint_decode_bytes(demo_dir("plain"), "fp16") * 2 == from_ckpt


def test_tiny_run_end_to_end(tmp_path):
    """Checkpoint, export, int8 copy and JAX conversion built into --work, every row measured in its
    own process, the demo model's accuracy per row; table, JSON and the report re-rendered from the JSON."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("jax")
    out = tmp_path / "out"
    code = bench.main(
        [
            "--size",
            "tiny",
            "--backends",
            "torch,onnx,jax,onnx-fused-kv8",
            "--precision",
            "fp32,int8",
            "--repeats",
            "1",
            "--decode-steps",
            "3",
            "--prompt-tokens",
            "16",
            "--image-size",
            "56x56",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
            "--accuracy",
            "20",
        ]
    )
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    rows = {(r["backend"], r["precision"]): r for r in doc["results"]}
    for key in (("torch", "fp32"), ("onnx", "fp32"), ("jax", "fp32"), ("onnx", "int8")):
        assert rows[key]["status"] == "ok", (key, rows[key].get("reason"), rows[key].get("traceback"))
        assert len(rows[key]["tokens"]) == 4 and rows[key]["decode"]["tokens_per_s"] > 0
    assert rows[("onnx", "fp32")]["tokens_agree_with_torch"] == 4  # same greedy tokens as torch
    assert rows[("jax", "fp32")]["tokens_agree_with_torch"] == 4
    assert rows[("onnx", "fp32")]["logits_error"] < 1e-4  # against torch fp32, the same prompt
    assert 0 < rows[("onnx", "int8")]["logits_error"] < 0.1  # int8 weights: measured, not zero
    assert rows[("torch", "int8")]["status"] == "skipped"
    for key in (("onnx-fused-kv8", "fp32"), ("onnx-fused-kv8", "int8")):  # another export, same runner
        assert rows[key]["status"] == "ok" and rows[key]["decode"]["tokens_per_s"] > 0, rows[key].get(
            "reason"
        )
        assert "GroupQueryAttention" in (Path(rows[key]["path"]) / "manifest.json").read_text()
    # --accuracy: the trained demo model at each measured row's backend and precision
    for key in (("torch", "fp32"), ("onnx", "fp32"), ("jax", "fp32"), ("onnx", "int8")):
        acc = rows[key]["demo_accuracy"]
        assert acc["n"] == 20 and 0.5 <= acc["accuracy"] <= 1, (key, acc)
    assert rows[("torch", "fp32")]["demo_accuracy"]["delta_points"] == 0
    assert "demo_accuracy" not in rows[("torch", "int8")]
    assert "demo-model accuracy (vs torch fp32)" in (out / "table.md").read_text()
    assert (out / "table.md").read_text().startswith("SliMM plain tiny")
    again = report.render(out / "results.json", tmp_path / "again")
    assert "| onnx | int8 |" in again and (tmp_path / "again" / "table.md").exists()


def test_serve_benchmark_refuses_a_bad_block_size(capsys):
    from benchmarks import serve

    with pytest.raises(SystemExit) as e:
        serve.parse_args(["--block-size", "48"])
    assert e.value.code == 2
    assert "block size 48 must be a power of two >= 16" in capsys.readouterr().err
    assert serve.parse_args(["--backend", "onnx-fused", "--block-size", "128"]).block_size == 128


def test_vision_gemms_prints_each_gemm_in_both_engines(capsys):
    pytest.importorskip("onnxruntime")
    from benchmarks import vision_gemms

    vision_gemms.main(["--patches", "4", "--threads", "1"])
    out = capsys.readouterr().out
    for name, k, n in vision_gemms.SHAPES:
        assert f"| {name} | 4 x {k} x {n} |" in out
    assert "x 32 blocks:" in out
    # the floor: 32 blocks of the four GEMMs and attention's two products (4 x 4 x 1280 flops each) at 4 patches
    flops = 32 * (sum(2 * 4 * k * n for _, k, n in vision_gemms.SHAPES) + 4 * 16 * 1280)
    assert f"the tower's products: {flops / 1e9:.0f} GFLOP" in out and "they alone take" in out
