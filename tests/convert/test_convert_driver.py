"""`slimm convert` as a whole (the driver): clear errors for bad inputs, file names from a manifest
kept inside their directories, the output built aside and moved into place whole, an existing
--out replaced only when that is safe, written files readable as the umask says."""

from __future__ import annotations

import os
import shutil

import pytest
from prompts import edit_json

pytest.importorskip("jax")
pytest.importorskip("onnxruntime")

from slimm.convert.driver import convert_export  # noqa: E402
from slimm.convert.ir import ConversionError  # noqa: E402
from slimm.errors import BackendUnavailable, CheckpointError, InputError  # noqa: E402


def test_corrupt_onnx_file_is_a_clear_error(tmp_path):
    from slimm.convert import generate_source

    bad = tmp_path / "SliMM_F.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf" * 3)
    with pytest.raises(ConversionError, match="SliMM_F.onnx: not a readable ONNX model"):
        generate_source(bad, "jax")


def test_framework_not_installed_is_a_clear_error(exported, tmp_path, monkeypatch):
    import importlib

    real = importlib.import_module

    def no_paddle(name, *args, **kwargs):
        if name == "slimm.convert.targets.paddle.codegen" or name.startswith("paddle"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_paddle)
    with pytest.raises(BackendUnavailable, match="paddle"):
        convert_export(exported("plain"), "paddle", tmp_path / "p", progress=False)


def test_unknown_target_is_a_clear_error(exported, tmp_path):
    with pytest.raises(ConversionError, match="unknown target 'tensorflow'"):
        convert_export(exported("plain"), "tensorflow", tmp_path / "t", progress=False)


@pytest.mark.parametrize("bad", ["../../x", "/tmp/x", "sub/x", "..", "a\\b"])
@pytest.mark.parametrize("where", ["files", "part"])
def test_manifest_file_names_must_stay_inside_the_directory(exported, tmp_path, bad, where):
    def edit(m):
        if where == "files":
            m["files"] = [*m.get("files", []), bad]
        else:
            m["parts"]["C"]["file"] = bad

    src = shutil.copytree(exported("plain"), tmp_path / "export")
    edit_json(src / "manifest.json", edit)
    with pytest.raises(
        CheckpointError, match=f"manifest.json: .*{bad!r}.* not a plain file name".replace("\\", "\\\\")
    ):
        convert_export(src, "jax", tmp_path / "deep" / "er" / "out", progress=False)
    assert not (tmp_path / "deep").exists() or not any((tmp_path / "deep").rglob("*"))


@pytest.mark.parametrize("where", ["same", "inside", "holding"])
def test_out_must_not_be_the_export_dir_inside_or_around_it(exported, tmp_path, where):
    src = shutil.copytree(exported("plain"), tmp_path / "a" / "export")
    before = sorted(p.name for p in src.iterdir())
    out = {"same": src, "inside": src / "jax", "holding": tmp_path / "a"}[where]
    with pytest.raises(InputError, match="must not be the export directory"):
        convert_export(src, "jax", out, progress=False, overwrite=True)
    assert sorted(p.name for p in src.iterdir()) == before


def test_a_foreign_non_empty_out_is_refused_unless_overwrite(exported, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty and not a previous `slimm convert` output.*--overwrite"):
        convert_export(exported("plain"), "jax", out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    convert_export(exported("plain"), "jax", out, progress=False, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "manifest.json").exists()


def test_a_previous_conversion_is_replaced_whole_and_a_failed_run_leaves_it(
    converted, exported, tmp_path, monkeypatch
):
    out = shutil.copytree(converted("jax"), tmp_path / "out")
    (out / "stale.txt").write_text("from an older conversion")
    convert_export(exported("plain"), "jax", out, progress=False)
    assert not (out / "stale.txt").exists()

    from slimm.convert import get_target

    tgt = type(get_target("jax"))
    real = tgt.save

    def dies_at_d(self, module, weights, inputs, out_dir, name):
        if name.endswith("_D"):
            raise KeyboardInterrupt  # as a killed run
        return real(self, module, weights, inputs, out_dir, name)

    monkeypatch.setattr(tgt, "save", dies_at_d)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        convert_export(exported("plain"), "jax", out, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no half-built sibling left
    with pytest.raises(KeyboardInterrupt):
        convert_export(exported("plain"), "jax", tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()  # nothing that could be loaded


def test_written_files_follow_the_umask(exported, tmp_path):
    old = os.umask(0o022)
    try:
        out = convert_export(exported("plain"), "jax", tmp_path / "out", progress=False)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    want = {k: 0o755 if (out / k).is_dir() else 0o644 for k in modes}
    assert modes == want
