"""ONNX export: each part against the PyTorch module it came from, the ONNX Runtime backend against
the torch backend end to end, fixed decode shapes, and the errors for broken export directories."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from prompts import CASES, decoder_feed_shapes, edit_json, make_inputs, rel_err

ort = pytest.importorskip("onnxruntime")

from slimm.backends.onnx import OnnxBackend  # noqa: E402
from slimm.backends.torch import TorchBackend  # noqa: E402
from slimm.errors import CheckpointError, InputError  # noqa: E402
from slimm.export.export import PartA, PartC, PartD, PartE, PartF, export_model  # noqa: E402
from slimm.export.manifest import PARTS, Manifest, part_file  # noqa: E402
from slimm.host.vision_index import vision_host_inputs  # noqa: E402

VARIANTS = ("plain", "v1", "midlayers", "efficient")


def session(export_dir, part):
    return ort.InferenceSession(str(export_dir / part_file(part)), providers=["CPUExecutionProvider"])


def test_export_directory_layout(exported):
    d = exported("v1")
    manifest = Manifest.read(d)
    datas = set()
    for part in PARTS:
        entry = manifest.parts[part]
        assert (d / entry.file).exists()
        if entry.data:
            assert entry.data == entry.file + ".data"  # each part its own data file
            datas.add(entry.data)
        sess = session(d, part)
        assert [i.name for i in sess.get_inputs()] == [t.name for t in entry.inputs]
        assert [o.name for o in sess.get_outputs()] == [t.name for t in entry.outputs]
    assert {"SliMM_A.onnx.data", "SliMM_F.onnx.data"} <= datas
    for name in ("tokenizer.json", "chat_template.json", "preprocessor_config.json", "config.json"):
        assert (d / name).exists()
    assert manifest.tokenizer is True and manifest.max_seq_len == 256


@pytest.mark.parametrize("variant", VARIANTS)
def test_part_b_matches_torch(exported, torch_model, variant):
    """Vision encoder on several sizes, two images in one call (block-diagonal mask), a video."""
    model = torch_model(variant)
    cfg = model.config
    sess = session(exported(variant), "B")
    for grids in ([(1, 4, 6)], [(1, 8, 4)], [(1, 4, 6), (1, 6, 4)], [(2, 4, 4)]):
        inputs = make_inputs(cfg, [[("image", g) for g in grids]], seed=len(grids))
        pix, grid = inputs["pixel_values"], inputs["image_grid_thw"]
        host = vision_host_inputs(cfg.deepstack_type, cfg.spatial_merge_size, grid)
        got = sess.run(None, {"pixel_values": pix, **host})
        with torch.no_grad():
            tokens, slices = model.visual.encode(torch.from_numpy(pix), grid)
        assert rel_err(got[0], tokens.numpy()) < 1e-5, grids
        if cfg.use_deepstack:
            assert rel_err(got[1], slices.numpy()) < 1e-5, grids


def test_parts_a_c_d_e_match_torch(exported, torch_model):
    model = torch_model("plain")
    d = exported("plain")
    rng = np.random.default_rng(0)
    hidden = model.config.text.hidden_size
    for B, S in ((1, 5), (2, 13)):
        ids = rng.integers(0, model.config.text.vocab_size, (B, S)).astype(np.int64)
        with torch.no_grad():
            ref = PartA(model)(torch.from_numpy(ids)).numpy()
        assert rel_err(session(d, "A").run(None, {"input_ids": ids})[0], ref) < 1e-6
        emb = rng.standard_normal((B, S, hidden)).astype(np.float32)
        vis = rng.standard_normal((3, hidden)).astype(np.float32)
        pos = np.array([0, 2, B * S - 1], np.int64)
        ref = PartC()(*(torch.from_numpy(x) for x in (emb, vis, pos))).numpy()
        got = session(d, "C").run(None, {"inputs_embeds": emb, "visual_embeds": vis, "visual_pos": pos})[0]
        assert rel_err(got, ref) < 1e-6
        pid = rng.integers(0, 300, (3, B, S)).astype(np.int64)
        with torch.no_grad():
            ref_d = PartD(model)(torch.from_numpy(pid))
            ref_e = PartE(model)(torch.from_numpy(pid[0]))
        for got, ref in zip(session(d, "D").run(None, {"position_ids": pid}), ref_d, strict=True):
            assert rel_err(got, ref.numpy()) < 1e-5
        for got, ref in zip(session(d, "E").run(None, {"position_ids": pid[0]}), ref_e, strict=True):
            assert rel_err(got, ref.numpy()) < 1e-5


@pytest.mark.parametrize("variant", ["plain", "v1"])
def test_part_f_matches_torch(exported, torch_model, variant):
    """Decoder with a half-filled cache, left padding, DeepStack slices, batch 2."""
    model = torch_model(variant)
    cfg = model.config
    t = cfg.text
    rng = np.random.default_rng(1)
    B, S, T = 2, 6, 10
    feeds = {
        "inputs_embeds": rng.standard_normal((B, S, t.hidden_size)).astype(np.float32),
        "cos": np.cos(rng.standard_normal((B, S, t.head_dim))).astype(np.float32),
        "sin": np.sin(rng.standard_normal((B, S, t.head_dim))).astype(np.float32),
        "past_mask": np.array([[1] * 4 + [0] * 6, [0, 1, 1, 1] + [0] * 6], np.int64),
        "cur_mask": np.array([[1] * 6, [0, 0, 1, 1, 1, 1]], np.int64),
    }
    for kind in ("key", "value"):
        for i in range(t.num_hidden_layers):
            feeds[f"past_{kind}.{i}"] = rng.standard_normal((B, t.num_key_value_heads, T, t.head_dim)).astype(
                np.float32
            )
    if cfg.use_deepstack:
        feeds["deepstack"] = rng.standard_normal((4, 3, t.hidden_size)).astype(np.float32)
        feeds["visual_pos"] = np.array([2, 3, 9], np.int64)
    got = session(exported(variant), "F").run(None, feeds)
    n = t.num_hidden_layers
    args = [torch.from_numpy(feeds[k]) for k in ("inputs_embeds", "cos", "sin", "past_mask", "cur_mask")]
    args += [
        [torch.from_numpy(feeds[f"past_key.{i}"]) for i in range(n)],
        [torch.from_numpy(feeds[f"past_value.{i}"]) for i in range(n)],
    ]
    if cfg.use_deepstack:
        args += [torch.from_numpy(feeds["deepstack"]), torch.from_numpy(feeds["visual_pos"])]
    with torch.no_grad():
        ref = PartF(model)(*args)
    assert rel_err(got[0], ref[0].numpy()) < 1e-5
    np.testing.assert_array_equal(got[1], ref[1].numpy())
    for g, r in zip(got[2:], ref[2:], strict=True):
        assert rel_err(g, r.numpy()) < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(CASES))
def test_onnx_backend_matches_torch_end_to_end(exported, torch_model, variant, case):
    model = torch_model(variant)
    inputs = make_inputs(model.config, CASES[case], seed=3)
    kw = dict(max_new_tokens=32, output_logits=True, return_dict_in_generate=True, eos_token_id=[])
    ref = TorchBackend(model).generate(**inputs, **kw)
    got = OnnxBackend(exported(variant)).generate(**inputs, **kw)
    np.testing.assert_array_equal(got.sequences, ref.sequences)
    assert len(got.logits) == 32
    assert max(rel_err(a, b) for a, b in zip(got.logits, ref.logits, strict=True)) < 1e-4


def test_fp16_export_within_fp16_tolerance(exported, torch_model):
    """fp16 stores weights in float16 (compute float32): logits within 1e-2 relative of torch fp32,
    the error of rounding every weight to 11 significant bits."""
    model = torch_model("v1")
    d = exported("v1", "fp16")
    assert (d / "SliMM_F.onnx.data").stat().st_size < 0.6 * (
        exported("v1") / "SliMM_F.onnx.data"
    ).stat().st_size
    inputs = make_inputs(model.config, CASES["image"], seed=4)
    kw = dict(max_new_tokens=8, output_logits=True, return_dict_in_generate=True, eos_token_id=[])
    ref = TorchBackend(model).generate(**inputs, **kw)
    got = OnnxBackend(d).generate(**inputs, **kw)
    assert rel_err(got.logits[0], ref.logits[0]) < 1e-2


def test_decode_step_shapes_never_change(exported, torch_model):
    backend = OnnxBackend(exported("v1"))
    shapes = decoder_feed_shapes(backend, make_inputs(torch_model("v1").config, CASES["batch2"], seed=5), 6)
    assert len(shapes) == 6
    assert all(s == shapes[1] for s in shapes[1:])  # every decode step: identical shapes
    cap = shapes[0]["past_key.0"][2]
    assert shapes[1]["past_key.0"][2] == cap and shapes[1]["inputs_embeds"][1] == 1


def test_missing_part_file(exported, tmp_path):
    d = shutil.copytree(exported("plain"), tmp_path / "e")
    (d / "SliMM_B.onnx").unlink()
    with pytest.raises(CheckpointError, match="SliMM_B.onnx: part B"):
        OnnxBackend(d)


def test_missing_data_file(exported, tmp_path):
    d = shutil.copytree(exported("plain"), tmp_path / "e")
    (d / "SliMM_F.onnx.data").unlink()
    with pytest.raises(CheckpointError, match="SliMM_F.onnx.data"):
        OnnxBackend(d)


def test_part_from_another_export(exported, tmp_path):
    d = shutil.copytree(exported("plain"), tmp_path / "e")
    other = exported("v1")
    for name in ("SliMM_B.onnx", "SliMM_B.onnx.data"):
        shutil.copy(other / name, d / name)
    with pytest.raises(CheckpointError, match="another export"):
        OnnxBackend(d)


def test_manifest_that_does_not_match_parts(exported, tmp_path):
    d = shutil.copytree(exported("plain"), tmp_path / "e")
    edit_json(d / "manifest.json", lambda m: m["parts"]["A"]["inputs"][0].update(name="token_ids"))
    with pytest.raises(CheckpointError, match="token_ids"):
        OnnxBackend(d)
    (d / "manifest.json").write_text("{")
    with pytest.raises(CheckpointError, match="manifest.json: not valid JSON"):
        OnnxBackend(d)


def test_manifest_reads_into_typed_objects_and_writes_the_same_json(exported, tmp_path):
    src = exported("v1")
    raw = json.loads((src / "manifest.json").read_text())
    m = Manifest.read(src)
    assert m.config.deepstack_type == "v1" and m.max_seq_len == 256 and m.precision == "fp32"
    assert m.parts["A"].file == "SliMM_A.onnx" and m.parts["F"].input("inputs_embeds").dtype == "float32"
    assert m.to_dict() == raw and list(m.to_dict()) == list(raw)
    # a converted directory's manifest (as slimm convert writes it) round-trips too
    conv = {k: v for k, v in raw.items() if k != "weights_dtype"}
    conv.update(format="slimm-jax", target="jax", framework_version="0.0", validated=None)
    conv["parts"] = {
        p: {
            "name": f"SliMM_{p}",
            "source": f"SliMM_{p}.py",
            "files": [f"SliMM_{p}.bin"],
            "role": e["role"],
            "inputs": e["inputs"],
            "outputs": e["outputs"],
            "input_order": [t["name"] for t in e["inputs"]],
        }
        for p, e in raw["parts"].items()
    }
    (tmp_path / "manifest.json").write_text(json.dumps(conv))
    assert Manifest.read(tmp_path, fmt="slimm-jax").to_dict() == conv


@pytest.mark.parametrize(
    "entry, name",
    [
        ("parts.A.file", "../../x"),
        ("parts.B.data", "/etc/passwd"),
        ("files", "sub/tokenizer.json"),
        ("files", "..\\x"),
        ("files", ".."),
        ("parts.F.file", 7),
    ],
)
def test_manifest_file_names_must_stay_inside_the_directory(exported, tmp_path, entry, name):
    from slimm.export.quantize import quantize_export

    d = shutil.copytree(exported("plain"), tmp_path / "e")

    def edit(m):
        if entry == "files":
            m["files"].append(name)
        else:
            _, part, key = entry.split(".")
            m["parts"][part][key] = name

    edit_json(d / "manifest.json", edit)
    message = f"manifest.json: entry {entry} names {name!r}, which is not a plain file name"
    for load in (OnnxBackend, lambda d: quantize_export(d, tmp_path / "q", "int8", progress=False)):
        with pytest.raises(CheckpointError, match=re.escape(message)):
            load(d)
    assert not (tmp_path / "q").exists()


def test_prompt_past_the_cache_length(exported, torch_model):
    backend = OnnxBackend(exported("plain"))  # exported with max_seq_len 256
    inputs = make_inputs(torch_model("plain").config, [[250]])
    with pytest.raises(InputError, match="maximum sequence length 256"):
        backend.generate(**inputs, max_new_tokens=8)


def test_wrong_dtype_or_rank_names_part_and_input(exported):
    backend = OnnxBackend(exported("plain"))
    with pytest.raises(InputError, match="part A: input 'input_ids'"):
        backend.run("A", {"input_ids": np.zeros((2, 3), np.float32)})
    with pytest.raises(InputError, match="part E: input 'position_ids'"):
        backend.run("E", {"position_ids": np.zeros((3,), np.int64)})
    with pytest.raises(InputError, match="input_ids must be integer"):
        backend.generate(input_ids=np.zeros((1, 4), np.float32))


def test_checkpoint_without_tokenizer_exports_and_generates_from_ids(demo_dir, torch_model, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(demo_dir("plain"), ckpt)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json"):
        (ckpt / name).unlink()
    out = export_model(ckpt, tmp_path / "onnx", parts=PARTS, max_seq_len=64, progress=False)
    assert Manifest.read(out).tokenizer is False
    backend = OnnxBackend(out)
    assert backend.processor is None
    with pytest.raises(InputError, match="no tokenizer"):
        backend.prepare("hi")
    seq = backend.generate(input_ids=np.array([[1, 2, 3]]), max_new_tokens=4, eos_token_id=[])
    ref = TorchBackend(torch_model("plain")).generate(
        input_ids=np.array([[1, 2, 3]]), max_new_tokens=4, eos_token_id=[]
    )
    np.testing.assert_array_equal(seq, ref)


def test_generate_accepts_torch_tensors(exported, torch_model):
    inputs = make_inputs(torch_model("plain").config, CASES["image"])
    t_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}
    out = OnnxBackend(exported("plain")).generate(**t_inputs, max_new_tokens=3, eos_token_id=[])
    assert isinstance(out, torch.Tensor) and out.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize(
    "wrapper, module", [("torch", "torch"), ("jax", "jax"), ("paddle", "paddle"), ("mindspore", "mindspore")]
)
def test_wrapper_backends_match_onnx(exported, torch_model, wrapper, module):
    """`X-ort`: the same parts in ONNX Runtime, with framework X's tensors crossing the boundary."""
    pytest.importorskip(module)
    from slimm import load

    inputs = make_inputs(torch_model("v1").config, CASES["batch2"], seed=6)
    kw = dict(max_new_tokens=6, output_logits=True, return_dict_in_generate=True, eos_token_id=[])
    ref = OnnxBackend(exported("v1")).generate(**inputs, **kw)
    backend = load(exported("v1"), backend=f"{wrapper}-ort")
    assert backend.name == f"{wrapper}-ort"
    got = backend.generate(**inputs, **kw)
    np.testing.assert_array_equal(got.sequences, ref.sequences)
    assert max(rel_err(a, b) for a, b in zip(got.logits, ref.logits, strict=True)) < 1e-6


def test_export_files_follow_the_umask(exported):
    """onnx writes external data 0600 and the quantizers 0600: every file as the umask says."""
    from slimm.outdir import umask

    d = exported("plain")
    for p in [d, *d.iterdir()]:
        assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~umask(), p.name


def test_reexport_replaces_the_previous_export_whole(demo_dir, exported, tmp_path):
    out = tmp_path / "onnx"
    shutil.copytree(exported("plain"), out)  # the previous export: the session's, copied
    first = Manifest.read(out).export_id
    (out / "preprocessor_config.json").write_text("{}")  # a file of the previous export...
    (out / "stale.bin").write_text("old")
    ckpt = tmp_path / "ck"
    shutil.copytree(demo_dir("plain"), ckpt)
    (ckpt / "preprocessor_config.json").unlink()  # ...that the new one does not write
    export_model(ckpt, out, max_seq_len=64, progress=False)
    assert Manifest.read(out).export_id != first
    assert not (out / "stale.bin").exists() and not (out / "preprocessor_config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_a_failed_export_leaves_nothing_that_loads(demo_dir, tmp_path, monkeypatch):
    import slimm.export.export as export_module

    real = export_module._stamp

    def crash(path, export_id, part):
        real(path, export_id, part)
        if part == "C":
            raise KeyboardInterrupt  # as a user's Ctrl-C in the middle of the parts

    monkeypatch.setattr(export_module, "_stamp", crash)
    with pytest.raises(KeyboardInterrupt):
        export_model(demo_dir("plain"), tmp_path / "onnx", max_seq_len=64, progress=False)
    assert list(tmp_path.iterdir()) == []
