"""`slimm batch` on a local Ray (2 CPUs): answers equal `slimm generate` row by row, each id once, with
2 workers, after a worker process is killed mid-run, with bad rows, and resumed after an interruption;
the Python entry on a user's own Dataset."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from batch_helpers import BACKEND, MAX_NEW_TOKENS, PROMPT, generate_answer, read_out

from slimm.batch import answer_dataset, run_batch
from slimm.batch.output import Output


def run(input, output, **kw):
    kw = {"backend": BACKEND, "max_new_tokens": MAX_NEW_TOKENS, "workers": 2, "batch_size": 4, **kw}
    return run_batch(input, output, **kw)


def check_complete(rows: list[dict], expected: dict[str, str]) -> None:
    counts = Counter(r["id"] for r in rows)
    assert set(counts) == set(expected) and set(counts.values()) == {1}, f"ids not exactly once: {counts}"
    for r in rows:
        assert r["error"] is None, r
        assert r["answer"] == expected[r["id"]], f"{r['id']}: batch {r['answer']!r} != generate"


def test_answers_equal_generate_row_by_row(ray_runtime, images, expected, model, tmp_path, capsys):
    root, paths = images
    out = tmp_path / "out.parquet"
    summary = run(root, out)
    rows = read_out(out)
    check_complete(rows, expected)
    assert summary.rows == len(paths) == 24 and summary.errors == 0 and summary.skipped == 0
    assert not out.with_name("out.parquet.parts").exists()
    for r in rows:
        assert r["source"] == str(paths[r["id"]]) and r["prompt"] == PROMPT
        inputs = model.prepare(PROMPT, [str(paths[r["id"]])])
        assert r["prompt_tokens"] == inputs["input_ids"].shape[1]
        assert 1 <= r["completion_tokens"] <= MAX_NEW_TOKENS and r["seconds"] > 0
    # and the command itself, for two of the rows
    from slimm.cli import main

    for rid in ("img00.png", "a/b/img05.png"):
        args = ["generate", "--backend", BACKEND, "--image", str(paths[rid])]
        assert main([*args, "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0
        assert capsys.readouterr().out == expected[rid] + "\n"


def model_workers() -> set[int]:
    """Process ids of the live model actors of Ray Data (their process title names the class)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
            except OSError:
                continue
            if b"MapBatches(ModelWorker)" in cmdline:
                pids.add(int(entry))
    return pids


def test_killed_worker_is_retried_and_each_id_written_once(ray_runtime, images, expected, tmp_path):
    root, _ = images
    out = tmp_path / "out.parquet"
    parts = out.with_name("out.parquet.parts")
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=run(root, out, batch_size=1)))
    job.start()
    deadline = time.monotonic() + 240
    while not (parts.is_dir() and any(parts.glob("part-*.parquet"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = model_workers()
    assert job.is_alive() and workers, "the job ended before a worker could be killed mid-run"
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    job.join(300)
    assert not job.is_alive(), "the job did not finish after its worker was killed"
    check_complete(read_out(out), expected)
    assert result["summary"].errors == 0
    assert victim not in model_workers()


def test_bad_rows_get_errors_and_the_job_goes_on(ray_runtime, images, expected, model, tmp_path):
    root, paths = images
    (tmp_path / "broken.png").write_bytes(b"not an image")
    table = tmp_path / "rows.jsonl"
    rows = [
        {"id": "own-prompt", "image": str(paths["img00.png"]), "prompt": "What is in it?"},
        {"id": "two", "images": [str(paths["a/img01.png"]), str(paths["img03.png"])]},
        {"id": "relative", "image": "broken.png"},
        {"id": "missing", "image": "nowhere.png"},
        {"id": "nothing", "prompt": "no image"},
        {"id": "too-long", "image": str(paths["img00.png"]), "prompt": "word " * 5000},
        {"id": "plain", "image": str(paths["a/b/img02.png"])},
    ]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    summary = run(table, out)
    got = {r["id"]: r for r in read_out(out)}
    assert sorted(got) == sorted(r["id"] for r in rows) and summary.errors == 4
    assert "broken.png: cannot read it as an image" in got["relative"]["error"]
    assert "nowhere.png" in got["missing"]["error"]
    assert got["nothing"]["error"] == "the row has no image, images or video"
    assert "maximum sequence length 4096" in got["too-long"]["error"]
    for rid in ("relative", "missing", "nothing", "too-long"):
        assert got[rid]["answer"] is None
    assert got["plain"]["answer"] == expected["a/b/img02.png"] and got["plain"]["error"] is None
    assert got["own-prompt"]["answer"] == generate_answer(model, paths["img00.png"], "What is in it?")
    two = [paths["a/img01.png"], paths["img03.png"]]
    assert got["two"]["answer"] == generate_answer(model, two) and got["two"]["error"] is None
    assert json.loads(got["two"]["source"]) == [str(p) for p in two]


def test_resume_after_an_interrupted_run(ray_runtime, images, expected, tmp_path, monkeypatch):
    root, _ = images
    out = tmp_path / "out.parquet"
    parts = out.with_name("out.parquet.parts")
    write = Output.write
    written = []

    def write_then_stop(self, table):
        new = write(self, table)
        written.extend(new.to_pylist())
        if new.num_rows:
            raise KeyboardInterrupt  # Ctrl-C once the first rows are on disk
        return new

    monkeypatch.setattr(Output, "write", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(root, out, workers=1)
    monkeypatch.setattr(Output, "write", write)
    assert not out.exists() and len(list(parts.glob("part-*.parquet"))) == 1
    first = {r["id"]: r for r in written}
    assert 0 < len(first) < len(expected)

    from slimm.errors import InputError

    with pytest.raises(InputError, match="interrupted run; pass --resume"):
        run(root, out, workers=1)
    summary = run(root, out, workers=1, resume=True)
    assert summary.skipped == len(first) and summary.rows == len(expected) - len(first)
    rows = read_out(out)
    check_complete(rows, expected)
    for r in rows:  # the rows answered before the interruption are kept, not answered again
        if r["id"] in first:
            assert r == first[r["id"]]
    assert not parts.exists()
    summary = run(root, out, resume=True)  # nothing left: OUT stays as it is, and nothing runs
    assert summary.rows == 0 and summary.skipped == len(expected) and read_out(out) == rows


def test_answer_dataset_on_a_users_dataset(ray_runtime, images, expected):
    root, paths = images
    ids = ["img00.png", "a/img01.png", "a/b/img05.png", "img06.png"]
    items = [{"key": i, "image": str(paths[rid]), "label": rid} for i, rid in enumerate(ids)]
    ds = ray_runtime.data.from_items(items)
    answered = answer_dataset(ds, backend=BACKEND, max_new_tokens=MAX_NEW_TOKENS, batch_size=2)
    rows = sorted(answered.take_all(), key=lambda r: r["key"])
    assert [r["label"] for r in rows] == ids  # the user's columns pass through
    assert [r["answer"] for r in rows] == [expected[rid] for rid in ids]
    assert all(r["error"] is None and r["completion_tokens"] >= 1 for r in rows)
    assert {"_inputs", "_error"}.isdisjoint(rows[0])


def test_images_as_arrays_from_read_images(ray_runtime, images, expected):
    """ray.data.read_images gives H x W x 3 arrays: the same answers as from the files."""
    root, paths = images
    ds = ray_runtime.data.read_images(str(root / "a" / "b"), include_paths=True, mode="RGB")
    rows = answer_dataset(ds, backend=BACKEND, max_new_tokens=MAX_NEW_TOKENS, batch_size=4).take_all()
    assert len(rows) == 8
    for r in rows:
        rid = Path("/" + r["path"].lstrip("/")).relative_to(root).as_posix()
        assert r["answer"] == expected[rid], rid


def test_video_rows(ray_runtime, images, model, tmp_path):
    """A folder of frames in the video column, beside image rows: the answer `slimm generate --video`
    gives for the same folder."""
    from PIL import Image

    from slimm.batch.pipeline import STOP_TOKENS
    from slimm.processing.messages import fetch_video

    root, paths = images
    clip = tmp_path / "clip"
    clip.mkdir()
    for t in range(4):  # a square moving right
        frame = Image.new("RGB", (112, 84), "white")
        frame.paste((200, 30, 30), (10 + 20 * t, 20, 40 + 20 * t, 50))
        frame.save(clip / f"{t}.png")
    table = tmp_path / "rows.jsonl"
    rows = [{"id": "clip", "video": "clip"}, {"id": "still", "image": str(paths["img03.png"])}]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    summary = run(table, out, workers=1)
    got = {r["id"]: r for r in read_out(out)}
    assert summary.errors == 0 and sorted(got) == ["clip", "still"]
    frames = fetch_video({"type": "video", "video": str(clip)})
    want = "".join(
        model.stream(PROMPT, videos=[frames], max_new_tokens=MAX_NEW_TOKENS, eos_token_id=list(STOP_TOKENS))
    )
    assert got["clip"]["answer"] == want and got["clip"]["prompt_tokens"] > got["still"]["prompt_tokens"] / 4
    assert got["still"]["answer"] == generate_answer(model, paths["img03.png"])


def test_workers_split_the_cpus_into_threads(ray_runtime):
    """Each model worker reserves whole CPUs and runs that many threads, so workers on one machine do
    not run more threads than it has: the test runtime has 2 CPUs, the read stage takes one."""
    from slimm.batch.cluster import cpus_per_worker, local_cpus, read_cpus, threads_for

    read = read_cpus(ray_runtime)
    assert read == 1.0
    assert cpus_per_worker(ray_runtime, 1, read) == 1.0 and threads_for(1.0) == 1
    assert cpus_per_worker(ray_runtime, 2, read) == 0.5 and threads_for(0.5) == 1
    assert local_cpus(1) == (os.cpu_count() or 1) + 1  # the read stage's CPU beside the machine's
