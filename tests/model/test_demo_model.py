"""The trained demo model and its pieces: the synthetic task's answers checked against the rendered
pixels, held-out JSONL sets, `slimm eval`'s scoring and bad rows, a few training steps, packing,
and (when the weights are in the package) the shipped model's accuracy.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from slimm import synthetic
from slimm.evaluation import evaluate, is_match, normalise, read_jsonl, run_eval

# ---- the generator: answers must follow from the pixels alone ----------------------------------------


def blobs(image) -> list[dict]:
    """Connected regions of one palette colour: colour name, kind by fill ratio, centroid, bbox."""
    from scipy import ndimage

    arr = np.asarray(image).astype(np.int64)
    out = []
    for name, rgb in synthetic.COLOURS.items():
        mask = (arr == np.array(rgb)).all(axis=2)
        labels, n = ndimage.label(mask)
        for i in range(1, n + 1):
            ys, xs = np.nonzero(labels == i)
            w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
            fill = len(xs) / (w * h)  # square 1, circle pi/4, triangle 1/2
            kind = "square" if fill > 0.93 else "circle" if fill > 0.65 else "triangle"
            box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            out.append({"colour": name, "kind": kind, "cx": xs.mean(), "cy": ys.mean(), "box": box})
    return out


def check_against_pixels(s: synthetic.Sample) -> None:
    if s.type == "motion":
        first, last = blobs(s.frames[0]), blobs(s.frames[-1])
        assert len(first) == len(last) == 1
        dx, dy = last[0]["cx"] - first[0]["cx"], last[0]["cy"] - first[0]["cy"]
        seen = ("Right." if dx > 0 else "Left.") if abs(dx) > abs(dy) else ("Down." if dy > 0 else "Up.")
        assert s.answer == seen
        return
    found = blobs(s.image)
    w, h = s.image.size
    assert len(found) == len(s.shapes)  # no shapes touching or hidden
    if s.type == "count":
        kind = s.question.split()[2][:-1]  # "How many circles are there?"
        n = sum(b["kind"] == kind for b in found)
        assert normalise(s.answer) == str(n)
        return
    assert len(found) in (1, 2)
    if s.type == "colour":
        kind = s.question.rstrip("?").split()[-1]
        assert [b["colour"] for b in found if b["kind"] == kind] == [s.answer[:-1].lower()]
    elif s.type == "shape":
        colour = s.question.rstrip("?").split()[-1]
        assert [f"The {b['kind']}." for b in found if b["colour"] == colour] == [s.answer]
    elif s.type == "position":
        colour, kind = s.question.rstrip("?").split()[-2:]
        (b,) = [b for b in found if b["colour"] == colour and b["kind"] == kind]
        (other,) = [o for o in found if o is not b]  # asked about two-shape scenes only
        horizontal = abs(b["cx"] - other["cx"]) > abs(b["cy"] - other["cy"])  # the relation tells the axis
        if horizontal:
            seen = "Left." if b["cx"] < w / 2 else "Right."
        else:
            seen = "Top." if b["cy"] < h / 2 else "Bottom."
        assert s.answer == seen
    else:  # describe: "A c1 k1 left of a c2 k2." / "A c1 k1 above a c2 k2."
        words = s.answer[:-1].split()
        c1, k1, c2, k2 = words[1], words[2], words[-2], words[-1]
        (a,) = [b for b in found if (b["colour"], b["kind"]) == (c1, k1)]
        (b,) = [b for b in found if (b["colour"], b["kind"]) == (c2, k2)]
        if "left of" in s.answer:
            assert a["cx"] < w / 2 < b["cx"] and abs(a["cx"] - b["cx"]) > abs(a["cy"] - b["cy"])
        else:
            assert a["cy"] < h / 2 < b["cy"] and abs(a["cy"] - b["cy"]) > abs(a["cx"] - b["cx"])


def test_answers_follow_from_the_rendered_pixels():
    pytest.importorskip("scipy")
    samples = [synthetic.make_sample(3, i, "heldout") for i in range(240)]
    assert {s.type for s in samples} == set(synthetic.QUESTION_TYPES)
    for s in samples:
        check_against_pixels(s)
    # dynamic resolution: several sizes and aspect ratios occur
    assert len({s.image.size for s in samples if s.image is not None}) >= 6


def test_pixel_check_catches_a_wrong_answer():
    pytest.importorskip("scipy")
    s = synthetic.make_sample(0, 3, "heldout", "count")
    wrong = synthetic.Sample(s.id, s.type, s.question, "Nine.", s.image, shapes=s.shapes)
    with pytest.raises(AssertionError):
        check_against_pixels(wrong)


def test_samples_are_seeded_and_splits_differ():
    a, b = synthetic.make_sample(0, 5), synthetic.make_sample(0, 5)
    assert a.question == b.question and a.answer == b.answer
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    train = [np.asarray(synthetic.make_sample(0, i, "train", "describe").image) for i in range(20)]
    held = [np.asarray(synthetic.make_sample(0, i, "heldout", "describe").image) for i in range(20)]
    assert not any(t.shape == h.shape and np.array_equal(t, h) for t in train for h in held)


def test_write_heldout(tmp_path):
    path = synthetic.write_heldout(tmp_path / "set", 12, seed=1)
    rows = read_jsonl(path)
    assert len(rows) == 12
    for r in rows:
        assert {"id", "type", "question", "answer"} <= set(r)
        media = path.parent / (r.get("image") or r["video"])
        assert media.exists()
    videos = [r for r in rows if "video" in r]
    assert videos and len(list((path.parent / videos[0]["video"]).iterdir())) == synthetic.VIDEO_FRAMES
    again = synthetic.write_heldout(tmp_path / "set2", 12, seed=1)
    assert again.read_text() == path.read_text()


# ---- scoring and bad rows ----------------------------------------------------------------------------


def test_normalise():
    assert normalise("Two.") == normalise("2") == "2"
    assert is_match("The circle.", "circle")
    assert is_match("  BLUE!", "Blue.")
    assert is_match("A red square left of a blue circle.", "red square left of blue circle")
    assert not is_match("Three.", "Two.")
    assert not is_match("blue", "Blue square.")
    assert is_match("left", ["Right.", "Left."])


class EchoModel:
    """A stand-in backend that answers from a table: checks the scoring without a network."""

    def __init__(self, answers):
        from slimm.processing import Processor, Tokenizer, default_tokenizer_dir

        self.answers = answers
        self.processor = Processor(Tokenizer.from_dir(default_tokenizer_dir()))
        self.seen_media = []

    def prepare(self, question, images=(), videos=()):
        self.seen_media.append((len(images), len(videos)))
        return {"input_ids": np.zeros((1, 3), np.int64), "question": question}

    def generate(self, input_ids, question, **kwargs):
        new = self.processor.tokenizer.encode(self.answers[question])
        return np.concatenate([input_ids, np.array([new])], axis=1)


def bad_rows_file(tmp_path):
    data = synthetic.write_heldout(tmp_path / "set", 6, seed=0)  # one row of each type
    rows = read_jsonl(data)
    lines = [json.dumps({k: v for k, v in r.items() if k != "_line"}) for r in rows]
    (data.parent / "broken.png").write_bytes(b"not an image")
    lines += [
        json.dumps({"id": "no-answer", "question": "What?", "image": rows[0]["image"]}),
        json.dumps({"id": "empty-answer", "question": "What?", "answer": " ", "image": rows[0]["image"]}),
        json.dumps({"id": "bad-image", "question": "What?", "answer": "Red.", "image": "broken.png"}),
        json.dumps({"id": "no-file", "question": "What?", "answer": "Red.", "image": "missing.png"}),
        "{not json",
    ]
    data.write_text("\n".join(lines) + "\n")
    return data, rows


def test_eval_scores_and_reports_bad_rows(tmp_path):
    data, rows = bad_rows_file(tmp_path)
    answers = {r["question"]: r["answer"] for r in rows}
    answers[rows[1]["question"]] = "Nine."  # one wrong answer
    model = EchoModel(answers)
    report = evaluate(model, read_jsonl(data), base_dir=data.parent, progress=False)
    assert report["n"] == 6 and report["n_errors"] == 5
    assert report["correct"] == 5 and report["accuracy"] == 5 / 6
    assert sorted(report["by_type"]) == sorted(synthetic.QUESTION_TYPES)
    assert report["by_type"][rows[1]["type"]]["correct"] == 0
    why = {e["id"]: e["error"] for e in report["errors"] if "id" in e}
    assert "answer" in why["no-answer"] and "answer" in why["empty-answer"]
    assert "cannot read it as an image" in why["bad-image"]
    assert "missing.png" in why["no-file"]
    assert any("not valid JSON" in e["error"] and e["line"] == 11 for e in report["errors"])
    media = {r["type"]: seen for r, seen in zip(rows, model.seen_media, strict=False)}
    assert media["motion"] == (0, 1) and media["colour"] == (1, 0)  # a frames folder is one video


def test_run_eval_real_model_writes_report(tmp_path, demo_dir):
    """The whole path on a real (random-weight) checkpoint: load, prepare, generate, decode, report."""
    data, _ = bad_rows_file(tmp_path)
    out = tmp_path / "report.json"
    report = run_eval(
        data, model=demo_dir("v1"), backend="torch", out_json=out, progress=False, max_new_tokens=3
    )
    saved = json.loads(out.read_text())
    assert saved["n"] == 6 and saved["n_errors"] == 5 and saved["backend"] == "torch"
    assert all(isinstance(r["prediction"], str) for r in saved["rows"])
    assert report["accuracy"] == saved["accuracy"]


def test_run_eval_rejects_both_or_neither(tmp_path):
    from slimm.errors import InputError

    with pytest.raises(InputError, match="either"):
        run_eval(tmp_path / "x.jsonl", synthetic_n=3, model=tmp_path)
    with pytest.raises(InputError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl")


# ---- training and packing ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def few_steps(tmp_path_factory):
    from slimm.train_demo import TrainSettings, train

    out = tmp_path_factory.mktemp("train") / "ckpt"
    settings = TrainSettings(
        steps=8, batch=4, warmup=2, log_every=1, eval_every=100, eval_n=4, vision_steps=4
    )
    record = train(out, seed=0, settings=settings, log=lambda m: None)
    return out, record


def test_training_loss_falls_and_unused_rows_stay_zero(few_steps):
    from safetensors.torch import load_file

    out, record = few_steps
    losses = [e["loss"] for e in record["log"] if "loss" in e]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.5, losses
    embed = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    assert embed.shape[0] == 151936
    used = (embed != 0).any(dim=1)
    assert 20 < int(used.sum()) < 200  # the task's tokens only
    for token in (151643, 151655, 151656):  # padding and the placeholders: looked up, never trained
        assert not used[token]
    for name in ("config.json", "preprocessor_config.json", "chat_template.json", "tokenizer.json"):
        assert (out / name).is_file()


def test_attention_targets_name_the_asked_shapes(tmp_path):
    """Each word that names shapes looks at the cells of exactly those shapes ("A" and "a" of a
    description at the first and the second one, a video's answer at the cells its shape moves
    through), and the position that gives the answer's key word reads the question's naming words."""
    from slimm.config import load_config
    from slimm.processing import Processor
    from slimm.train_demo import compact_config, encode, task_vocab, write_checkpoint_files

    write_checkpoint_files(tmp_path, seed=0)
    processor, cfg = Processor.from_pretrained(tmp_path), load_config(tmp_path)
    vocab = task_vocab(processor, cfg)
    colours, kinds = list(synthetic.COLOURS), list(synthetic.KINDS)
    for i in range(60):
        s = synthetic.make_sample(0, i, "heldout")
        e = encode(processor, vocab, s, cfg.eos_token_id[0], compact_config(cfg, vocab).spatial_merge_size)
        seq = np.concatenate([e.prompt, e.answer])
        words = [processor.tokenizer.decode([int(t)]).strip() for t in vocab.ids[seq]]
        looks = {words[p]: e.cells[e.look[p]] for p in np.nonzero(e.look.any(axis=1))[0]}  # AUX_HEADS targets
        asked = s.question.rstrip("?").split()
        if s.type == "motion":
            assert (
                list(looks) == [words[len(e.prompt) - 1]]
                and (looks[words[len(e.prompt) - 1]][:, 5] > 0).all()
            )
        elif s.type == "describe":
            first, second = s.shapes
            assert looks["A"][:, :2].tolist() == [
                [kinds.index(first.kind) + 1, colours.index(first.colour) + 1]
            ]
            assert looks["a"][:, :2].tolist() == [
                [kinds.index(second.kind) + 1, colours.index(second.colour) + 1]
            ]
        for word, cells in looks.items():
            if word in kinds:
                assert [kinds[k - 1] for k in cells[:, 0]] == [word]
            elif word.lower() in colours:
                assert [colours[c - 1] for c in cells[:, 1]] == [word.lower()]
            elif word[:-1] in kinds:  # "How many triangles": every triangle
                assert (
                    len(cells) == int(normalise(s.answer))
                    and (cells[:, 0] == kinds.index(word[:-1]) + 1).all()
                )
        readers = np.nonzero(e.read.any(axis=1))[0]
        if s.type in ("colour", "shape", "position", "count"):
            assert len(readers) == 1 and readers[0] >= len(e.prompt) - 1  # an answer position
            named = [words[p] for p in np.nonzero(e.read[readers[0]])[0]]
            assert named == [w for w in asked if w in colours or w in kinds or w[:-1] in kinds]
            assert all(w in looks for w in named)
        else:
            assert not len(readers)


def test_training_is_reproducible(few_steps, tmp_path):
    from slimm.train_demo import TrainSettings, train

    _, record = few_steps
    # the same settings as few_steps: the step count shapes the curriculum and the schedule
    settings = TrainSettings(
        steps=8, batch=4, warmup=2, log_every=1, eval_every=100, eval_n=4, vision_steps=4
    )
    again = train(tmp_path / "again", seed=0, settings=settings, log=lambda m: None)
    first = [e["loss"] for e in record["log"] if "loss" in e]
    assert [e["loss"] for e in again["log"] if "loss" in e] == pytest.approx(first, abs=1e-4)


def test_pack_and_unpack_rebuild_the_same_checkpoint(few_steps, tmp_path, monkeypatch):
    import hashlib

    from slimm import trained_demo

    out, _ = few_steps
    assets = trained_demo.pack(out, tmp_path / "assets")
    assert (assets / trained_demo.WEIGHTS).stat().st_size < 10_000_000  # the limit
    monkeypatch.setenv("SLIMM_CACHE", str(tmp_path / "cache"))
    unpacked = trained_demo.trained_demo_dir(assets)
    assert unpacked.parent == tmp_path / "cache"
    digest = [hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() for d in (out, unpacked)]
    assert digest[0] == digest[1]
    assert trained_demo.trained_demo_dir(assets) == unpacked  # second call: already there
    # a damaged package is refused by its checksum, and nothing half-written is left behind
    (assets / "manifest.json").write_text(
        json.dumps({**json.loads((assets / "manifest.json").read_text()), "model_sha256": "0" * 64})
    )
    from slimm.errors import CheckpointError

    with pytest.raises(CheckpointError, match="checksum"):
        trained_demo.trained_demo_dir(assets)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [unpacked.name]


# ---- the shipped model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    """The shipped demo model, unpacked into the run's cache (tests/conftest.py: slimm_cache)."""
    from slimm import trained_demo

    return trained_demo.trained_demo_dir()


# The bar: 500 held-out questions, >= 95% on torch; every backend within 0.5 points of torch
# with >= 99% identical answers. torch and onnx answer all 500; the converted backends, which compile
# once per prompt shape, answer the first 200 of the same questions (a 0.5-point difference is then
# one question); benchmarks/accuracy.py answers all 500 on every backend (README "Accuracy").
# Quantized exports: 200 questions each, against the limits below.
HELD_OUT = 500
CONVERTED_N = 200
QUANTIZED_N = 200
# points of accuracy a quantized export may lose against torch fp32: int8 the 2 points; int4
# and w8a8 measured -0.4 and 0.0 on 500 questions on an AVX-512 VNNI EPYC (README "Accuracy"), 2 points
# leave room for other CPUs' kernels (AVX2's u8s8 w8a8 path rounds differently). fp16 (0.0 measured)
# is in benchmarks/accuracy.py, not here: its export is a second full export, a minute of suite time.
MAX_DROP = {"int8": 2.0, "int4": 2.0, "w8a8": 2.0}


@pytest.fixture(scope="module")
def torch_report(shipped):
    return run_eval(synthetic_n=HELD_OUT, seed=0, model=shipped, backend="torch", progress=False)


def test_shipped_demo_model_sees(torch_report):
    assert torch_report["n_errors"] == 0
    assert torch_report["accuracy"] >= 0.95, torch_report["by_type"]


@pytest.mark.parametrize(
    "backend,n",
    [("onnx", HELD_OUT), ("jax", CONVERTED_N), ("paddle", CONVERTED_N), ("mindspore", CONVERTED_N)],
)
def test_every_backend_answers_as_torch(torch_report, backend, n):
    from slimm.cache import demo_dir_for
    from slimm.evaluation import compare

    report = run_eval(synthetic_n=n, seed=0, model=demo_dir_for(backend), backend=backend, progress=False)
    got = compare(report, torch_report)
    assert got["n"] == n
    assert got["identical"] >= 0.99, (backend, got)
    assert abs(got["delta_points"]) <= 0.5, (backend, got, report["by_type"])


@pytest.mark.parametrize("precision", list(MAX_DROP))
def test_quantized_exports_keep_the_answers(torch_report, precision):
    from slimm.cache import demo_dir_for
    from slimm.evaluation import compare

    model = demo_dir_for("onnx", precision)
    report = run_eval(synthetic_n=QUANTIZED_N, seed=0, model=model, backend="onnx", progress=False)
    got = compare(report, torch_report)
    assert got["delta_points"] >= -MAX_DROP[precision], (precision, got, report["by_type"])


def test_shipped_example_is_answered(shipped):
    import slimm
    from slimm import trained_demo

    model = slimm.load(shipped)
    manifest = trained_demo.read_manifest()
    for ex in manifest["examples"]:
        image = trained_demo.ASSET_DIR / ex["image"]
        text = "".join(model.stream(ex["question"], images=[str(image)], max_new_tokens=20))
        assert is_match(text, ex["answer"]), (ex, text)


def test_readme_first_command_prints_the_answer(shipped):
    """The README's first command, `slimm generate` with no --model on examples/shapes.png (the
    shipped example scene), prints exactly the example's answer."""
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    from slimm import trained_demo

    example = Path(__file__).resolve().parents[2] / "examples" / "shapes.png"
    shipped_image = trained_demo.ASSET_DIR / "example.png"
    assert np.array_equal(np.asarray(Image.open(example)), np.asarray(Image.open(shipped_image)))
    ex = trained_demo.read_manifest()["examples"][0]
    readme = (example.parents[1] / "README.md").read_text()
    assert f'--image examples/shapes.png --prompt "{ex["question"]}"' in readme
    assert f"It prints `{ex['answer']}`" in readme
    r = subprocess.run(
        [sys.executable, "-m", "slimm", "generate", "--image", str(example), "--prompt", ex["question"]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == ex["answer"], (ex, r.stdout)
