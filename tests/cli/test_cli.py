"""The `slimm` command: help, generate on a demo checkpoint, and one-line errors with exit status 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from prompts import run_python

from slimm.cli import build_parser, main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "astronaut.png"


def test_help_explains_every_command(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert p.description, name
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
        assert capsys.readouterr().out.startswith(f"usage: slimm {name}"), name
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "generate" in out and "demo-checkpoint" in out


def test_generate_streams_an_answer(demo_dir, capsys):
    code = main(
        [
            "generate",
            "--model",
            str(demo_dir("plain")),
            "--image",
            str(EXAMPLE),
            "--max-new-tokens",
            "5",
            "--stop-token",
            "0",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out.strip()  # some (meaningless) text
    assert "prompt" in captured.err


def test_generate_with_image_size_video_and_sampling(demo_dir, tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        shutil.copy(EXAMPLE, frames / f"{i:03d}.png")
    code = main(
        [
            "generate",
            "--model",
            str(demo_dir("v1")),
            "--image",
            str(EXAMPLE),
            "--video",
            str(frames),
            "--image-size",
            "112x140",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0.8",
            "--top-k",
            "5",
            "--seed",
            "1",
            "--prompt",
            "What happens?",
        ]
    )
    assert code == 0


def one_line_error(capsys, argv, *words):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for w in words:
        assert w in err, err


def test_missing_model_dir(capsys, tmp_path):
    one_line_error(
        capsys, ["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"], "nope", "not found"
    )


def test_truncated_image(demo_dir, tmp_path, capsys):
    bad = tmp_path / "cut.png"
    bad.write_bytes(EXAMPLE.read_bytes()[:300])
    one_line_error(capsys, ["generate", "--model", str(demo_dir("plain")), "--image", str(bad)], "cut.png")


def test_extreme_aspect_ratio(demo_dir, tmp_path, capsys):
    from PIL import Image

    p = tmp_path / "strip.png"
    Image.new("RGB", (3000, 10)).save(p)
    one_line_error(capsys, ["generate", "--model", str(demo_dir("plain")), "--image", str(p)], "aspect ratio")


def test_prompt_longer_than_max_seq_len(demo_dir, capsys):
    one_line_error(
        capsys,
        ["generate", "--model", str(demo_dir("plain")), "--image", str(EXAMPLE), "--max-seq-len", "20"],
        "maximum sequence length 20",
    )


def test_bad_image_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--image-size", "100x100"])
    assert e.value.code == 2
    assert "multiples of 28" in capsys.readouterr().err


def test_demo_checkpoint_command(tmp_path, capsys):
    assert main(["demo-checkpoint", str(tmp_path / "ck"), "--variant", "efficient"]) == 0
    assert (tmp_path / "ck" / "model.safetensors").exists()
    assert "meaningless" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "slimm", "--help"], capture_output=True, text=True, check=True
    )
    assert "SliMM" in out.stdout


def test_convert_to_all_in_a_fresh_process(exported, tmp_path):
    """`--to all` converts for every framework in one process: MindSpore has to be imported before
    Paddle there (both ship libdnnl.so.3), whatever order the targets come in."""
    for fw in ("jax", "paddle", "mindspore"):
        pytest.importorskip(fw)
    out = tmp_path / "all"
    r = subprocess.run(
        [sys.executable, "-m", "slimm", "convert", str(exported("plain")), "--to", "all", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for target in ("jax", "paddle", "mindspore"):
        assert (out / target / "manifest.json").exists(), target
        assert f"wrote {out / target} ({target})" in r.stdout


def test_generate_onnx_does_not_import_torch(exported):
    """`slimm generate --backend onnx` on an export: ONNX Runtime and NumPy only (torch is not loaded)."""
    argv = [
        "slimm",
        "generate",
        "--backend",
        "onnx",
        "--model",
        str(exported("plain")),
        "--image",
        str(EXAMPLE),
        "--max-new-tokens",
        "2",
    ]
    code = (
        "import sys, runpy\n"
        f"sys.argv = {argv!r}\n"
        "try:\n"
        "    runpy.run_module('slimm', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    r = run_python(code, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_building_the_parser_imports_no_framework():
    code = (
        "import sys\nfrom slimm.cli import build_parser\nbuild_parser()\n"
        "loaded = [m for m in ('torch', 'onnxruntime', 'jax', 'paddle', 'mindspore', 'PIL') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    r = run_python(code, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_verbose_is_set_before_the_command_runs(monkeypatch, capsys):
    monkeypatch.delenv("SLIMM_VERBOSE", raising=False)
    seen = {}

    def fake(args):
        seen["env"] = os.environ.get("SLIMM_VERBOSE")
        return 0

    monkeypatch.setattr("slimm.cli.cmd_operators", fake)
    assert main(["--verbose", "operators"]) == 0
    assert seen["env"] == "1"


def test_generate_reports_new_tokens_ttft_and_decode_rate(demo_dir, capsys):
    assert (
        main(["generate", "--model", str(demo_dir("plain")), "--max-new-tokens", "4", "--stop-token", "0"])
        == 0
    )
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("[torch] 4 new tokens (prompt "), last
    assert "time to first token" in last and "tokens/s" in last, last


@pytest.mark.parametrize(
    "command, option, default",
    [
        ("generate", "--max-new-tokens", "128"),
        ("generate", "--repetition-penalty", "1.0"),
        ("generate", "--backend", "torch"),
        ("bench", "--size", "tiny"),
        ("bench", "--variant", "plain"),
        ("bench", "--image-size", "448x448"),
        ("demo-checkpoint", "--variant", "plain"),
        ("demo-checkpoint", "--size", "tiny"),
        ("demo-checkpoint", "--dtype", "bfloat16"),
        ("export", "--max-seq-len", "4096"),
    ],
)
def test_help_shows_defaults(capsys, command, option, default):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    after = text[text.index(option + " ", text.index("options:")) :]
    assert f"default: {default})" in after[:300] or f"default {default})" in after[:300], after[:300]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--temperature", "-1"], ["temperature"]),
        (["--temperature", "nan"], ["temperature", "nan"]),
        (["--repetition-penalty", "nan"], ["repetition_penalty"]),
        (["--repetition-penalty", "0"], ["repetition_penalty"]),
        (["--top-p", "0"], ["top_p"]),
        (["--top-p", "1.5"], ["top_p"]),
        (["--top-k", "-1"], ["top_k"]),
        (["--min-pixels", "5000", "--max-pixels", "4000"], ["min_pixels 5000", "max_pixels 4000"]),
        (["--min-pixels", "-3"], ["min_pixels"]),
        (["--max-pixels", "-5"], ["max_pixels"]),
        (["--seed", "-1"], ["seed"]),
        (["--max-new-tokens", "100000000"], ["max_new_tokens", "32768"]),
        (["--max-seq-len", "100000000"], ["max_seq_len", "32768"]),
    ],
)
def test_bad_generation_settings_exit_2_with_one_line(demo_dir, capsys, args, words):
    one_line_error(
        capsys, ["generate", "--model", str(demo_dir("plain")), "--image", str(EXAMPLE), *args], *words
    )


def test_max_new_tokens_past_an_exports_cache(exported, capsys):
    one_line_error(
        capsys,
        ["generate", "--backend", "onnx", "--model", str(exported("plain")), "--max-new-tokens", "300"],
        "max_new_tokens 300",
        "256 positions",
    )


def test_the_api_runs_the_same_checks(demo_dir, torch_model):
    from slimm.errors import InputError
    from slimm.processing import Processor

    model = torch_model("plain")
    ids = np.array([[1, 2, 3]])
    for kw in (
        {"temperature": float("nan")},
        {"repetition_penalty": float("nan")},
        {"seed": -1},
        {"top_p": 0.0},
        {"max_new_tokens": 10**8},
    ):
        with pytest.raises(InputError):
            model.generate(input_ids=ids, **kw)
    for kw in ({"min_pixels": 5000, "max_pixels": 4000}, {"max_pixels": -5}):
        with pytest.raises(InputError, match="pixels"):
            Processor.from_pretrained(demo_dir("plain"), **kw)


def test_export_refuses_bad_settings_and_outputs_before_any_work(demo_dir, tmp_path, capsys):
    ckpt = str(demo_dir("plain"))
    one_line_error(
        capsys, ["export", "--model", ckpt, "--out", str(tmp_path / "e"), "--max-seq-len", "0"], "max_seq_len"
    )
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, ["export", "--model", ckpt, "--out", str(tmp_path / "file")], "is a file")
    one_line_error(
        capsys, ["export", "--model", ckpt, "--out", str(tmp_path / "file" / "sub")], "cannot be created"
    )
    one_line_error(capsys, ["export", "--model", ckpt, "--out", ckpt], "inside the model directory")
    one_line_error(
        capsys, ["export", "--model", ckpt, "--out", str(Path(ckpt) / "onnx")], "inside the model directory"
    )
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_text("mine")
    one_line_error(capsys, ["export", "--model", ckpt, "--out", str(other)], "not empty", "--overwrite")
    assert (other / "cat.jpg").read_text() == "mine"
    assert not (tmp_path / "e").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["file", "photos"]


def test_argparse_errors_are_one_line_with_status_2(capsys):
    """argparse's own refusals read like every other error: one line, exit status 2."""
    for argv, words in (
        (["generate", "--image-size", "0x10"], ("--image-size", "multiples of 28")),
        (["generate", "--bogus"], ("unrecognized arguments: --bogus",)),
        (["nope"], ("invalid choice: 'nope'",)),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
        assert all(w in err for w in words), err


def test_stop_tokens_outside_the_vocabulary_are_refused(demo_dir, capsys):
    one_line_error(
        capsys, ["generate", "--model", str(demo_dir("plain")), "--stop-token", "-1"], "stop token", "[-1]"
    )


def test_eval_on_synthetic_questions_writes_a_report(exported, tmp_path, capsys):
    """`slimm eval --synthetic N`: every question scored (the random-weight model answers none
    right), the per-type lines printed, the JSON report written; a missing data file is one line."""
    import json

    out = tmp_path / "report.json"
    code = main(
        [
            "eval",
            "--synthetic",
            "6",
            "--model",
            str(exported("plain")),
            "--backend",
            "onnx",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and printed.startswith("accuracy ")
    report = json.loads(out.read_text())
    assert (
        report["n"] == 6
        and report["backend"] == "onnx"
        and set(report["by_type"]) <= {"colour", "count", "describe", "motion", "position", "shape"}
    )
    one_line_error(
        capsys,
        ["eval", str(tmp_path / "nope.jsonl"), "--model", str(exported("plain")), "--backend", "onnx"],
        "nope.jsonl",
        "not found",
    )
    one_line_error(capsys, ["eval", "--model", str(exported("plain")), "--backend", "onnx"], "either")


def test_eval_precision_picks_the_demo_models_export_only(exported, capsys):
    """--precision chooses an export of the built-in demo model: with --model it is refused (an export
    has its own precision), off ONNX Runtime and unknown ones too, each before any model is built."""
    model = str(exported("plain"))
    one_line_error(
        capsys,
        ["eval", "--synthetic", "2", "--model", model, "--backend", "onnx", "--precision", "int8"],
        "--precision int8",
        "slimm export --precision",
    )
    one_line_error(capsys, ["eval", "--synthetic", "2", "--precision", "int3"], "--precision int3", "int4")
    one_line_error(
        capsys, ["eval", "--synthetic", "2", "--backend", "jax", "--precision", "int4"], "jax", "fp32", "int4"
    )


def test_export_quantizes_an_existing_export(exported, tmp_path, capsys):
    """`slimm export --model EXPORT --precision int8` quantizes the float32 export as it is; a float
    precision or a setting that only a checkpoint's export can change is one line naming it."""
    import json

    src = str(exported("plain"))
    assert main(["export", "--model", src, "--out", str(tmp_path / "q"), "--precision", "int8"]) == 0
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["precision"] == "int8"
    assert manifest["export_id"] == json.loads((exported("plain") / "manifest.json").read_text())["export_id"]
    capsys.readouterr()
    one_line_error(capsys, ["export", "--model", src, "--out", str(tmp_path / "f")], "already an ONNX export")
    one_line_error(
        capsys,
        ["export", "--model", src, "--out", str(tmp_path / "g"), "--precision", "int4", "--fused"],
        "--fused: set when",
    )
    assert not (tmp_path / "f").exists() and not (tmp_path / "g").exists()
