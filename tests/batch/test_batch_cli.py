"""`slimm batch` refusals: exit 2 with one line naming the problem, before any Ray runtime starts."""

from __future__ import annotations

import json
import socket
import sys
import time

import pytest

from slimm.cli import main


def refused(capsys, *argv) -> str:
    assert main(["batch", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"image": "a.png"}) + "\n")
    return path


def test_messages(capsys, tmp_path, table):
    out = tmp_path / "o.parquet"
    assert "nope does not exist" in refused(capsys, tmp_path / "nope", "--output", out)
    bare = tmp_path / "bare.csv"
    bare.write_text("id,prompt\n1,hi\n")
    assert "has no image, images or video column (its columns: id, prompt)" in refused(
        capsys, bare, "--output", out
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images" in refused(capsys, empty, "--output", out)
    twice = tmp_path / "twice.jsonl"
    twice.write_text('{"id": 1, "image": "a.png"}\n{"id": 1, "image": "b.png"}\n')
    assert "ids must be unique" in refused(capsys, twice, "--output", out)
    assert ".parquet" in refused(capsys, table, "--output", tmp_path / "o.csv")


def test_existing_output_is_not_overwritten(capsys, tmp_path, table):
    out = tmp_path / "o.parquet"
    out.write_bytes(b"precious")
    assert "exists; pass --resume" in refused(capsys, table, "--output", out)
    assert out.read_bytes() == b"precious"


def test_unreachable_ray_address_fails_fast(capsys, tmp_path, table):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t0 = time.monotonic()
    err = refused(capsys, table, "--output", tmp_path / "o.parquet", "--ray-address", f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 10
    assert f"127.0.0.1:{port}: cannot reach a Ray cluster" in err and "ray start --head" in err
    assert "expected auto, HOST:PORT" in refused(
        capsys, table, "--output", tmp_path / "o.parquet", "--ray-address", "nonsense"
    )


def test_ray_not_installed_names_the_extra(capsys, tmp_path, table, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    err = refused(capsys, table, "--output", tmp_path / "o.parquet")
    assert 'pip install -e ".[ray]"' in err
    assert main(["serve", "--ray"]) == 2
    assert 'pip install -e ".[ray]"' in capsys.readouterr().err
