"""The `slimm` command: help, generate on a demo checkpoint, and one-line errors with exit status 2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slimm.cli import build_parser, main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "astronaut.png"


def test_help_explains_every_command(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert p.description, name
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "generate" in out and "demo-checkpoint" in out


def test_generate_streams_an_answer(demo_dir, capsys):
    code = main(["generate", "--model", str(demo_dir("plain")), "--image", str(EXAMPLE), "--max-new-tokens", "5",
                 "--stop-token", "0"])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out.strip()  # some (meaningless) text
    assert "prompt" in captured.err


def test_generate_with_image_size_video_and_sampling(demo_dir, tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        shutil.copy(EXAMPLE, frames / f"{i:03d}.png")
    code = main(["generate", "--model", str(demo_dir("v1")), "--image", str(EXAMPLE), "--video", str(frames),
                 "--image-size", "112x140", "--max-new-tokens", "4", "--temperature", "0.8", "--top-k", "5",
                 "--seed", "1", "--prompt", "What happens?"])  # fmt: skip
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
    r = subprocess.run([sys.executable, "-m", "slimm", "convert", str(exported("plain")), "--to", "all", "--out",
                        str(out)], capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    for target in ("jax", "paddle", "mindspore"):
        assert (out / target / "manifest.json").exists(), target
        assert f"wrote {out / target} ({target})" in r.stdout
