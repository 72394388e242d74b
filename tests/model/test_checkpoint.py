"""Checkpoint directories: config layouts, weight names and shapes, shards, dtypes, and the errors
that name what is wrong."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from prompts import edit_json, rel_err
from safetensors.torch import load_file, save_file

from slimm.config import load_config
from slimm.demo import demo_configs
from slimm.errors import CheckpointError
from slimm.model.slimm import SliMMForConditionalGeneration


def logits_of(path, dtype="float32"):
    model = SliMMForConditionalGeneration.from_pretrained(path, torch_dtype=dtype)
    return model(input_ids=torch.tensor([[1, 2, 3, 151644, 9]])).logits


@pytest.mark.parametrize("variant", ["plain", "v1", "midlayers", "efficient"])
def test_demo_checkpoint_has_the_released_files(demo_dir, variant):
    d = demo_dir(variant)
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "added_tokens.json",
        "special_tokens_map.json",
        "chat_template.json",
    ):
        assert (d / name).exists(), name
    assert (d / "processor_config.json").exists() == (variant == "efficient")
    cfg = load_config(d)
    assert cfg.use_deepstack == (variant != "plain")
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643] and gen["pad_token_id"] == 151643


def test_released_sizes_have_the_released_shapes():
    c = demo_configs("plain", "0.5b")["config.json"]
    assert (c["model_type"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]) == (
        "qwen2",
        896,
        24,
        14,
    )
    assert c["vision_config"]["embed_dim"] == 1280 and c["vision_config"]["depth"] == 32
    c = demo_configs("efficient", "2b")["config.json"]
    assert (c["model_type"], c["hidden_size"], c["num_hidden_layers"]) == ("qwen2_vl", 1536, 28)
    assert c["rope_scaling"]["mrope_section"] == [16, 24, 24]


def test_qwen2_model_type_derives_the_mrope_section(demo_dir):
    cfg = load_config(demo_dir("plain"))  # head_dim 64: 2*sum([16,24,24]) > 64
    assert cfg.model_type == "qwen2" and cfg.text.mrope_section == [8, 12, 12]


def test_sharded_checkpoint_loads_the_same(demo_dir, tmp_path):
    d = shutil.copytree(demo_dir("plain"), tmp_path / "sharded")
    state = load_file(d / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    index = {"metadata": {}, "weight_map": {}}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, str(d / fname))
        index["weight_map"].update({n: fname for n in part})
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.testing.assert_close(logits_of(d), logits_of(demo_dir("plain")), rtol=0, atol=0)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        logits_of(d)


def test_untied_lm_head_and_transformers5_names(demo_dir, tmp_path):
    d = shutil.copytree(demo_dir("plain"), tmp_path / "untied")
    state = load_file(d / "model.safetensors")
    head = torch.randn(state["model.embed_tokens.weight"].shape, generator=torch.Generator().manual_seed(0))
    renamed = {
        k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else "model." + k: v
        for k, v in state.items()
    }
    renamed["lm_head.weight"] = head.to(torch.bfloat16)
    save_file(renamed, str(d / "model.safetensors"))
    edit_json(d / "config.json", tie_word_embeddings=False)
    model = SliMMForConditionalGeneration.from_pretrained(d, torch_dtype="float32")
    assert model.lm_head is not None
    torch.testing.assert_close(model.lm_head.weight, head.to(torch.bfloat16).float())


def test_dtypes_auto_bf16_fp16(demo_dir):
    d = demo_dir("plain")
    assert SliMMForConditionalGeneration.from_pretrained(d, torch_dtype="auto").dtype == torch.bfloat16
    ref = logits_of(d)
    for dtype in ("bfloat16", "float16"):
        got = logits_of(d, dtype)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        err = rel_err(got.detach(), ref.detach())
        assert err < 0.05, (dtype, err)


def test_custom_visual_model_directory(demo_dir, tmp_path):
    """qwen2 model type with the vision config (and optionally weights) in a custom_visual_model dir."""
    d = shutil.copytree(demo_dir("plain"), tmp_path / "ckpt")
    vision = json.loads((d / "config.json").read_text())["vision_config"]
    vdir = d / "dfn-vit"
    vdir.mkdir()
    (vdir / "config.json").write_text(json.dumps(vision))  # flat vision config, model_type qwen2_vl
    edit_json(d / "config.json", vision_config=None, custom_visual_model="dfn-vit")
    torch.testing.assert_close(logits_of(d), logits_of(demo_dir("plain")), rtol=0, atol=0)
    # vision weights only in the custom directory
    state = load_file(d / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("visual.")}, str(d / "model.safetensors"))
    save_file(
        {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")},
        str(vdir / "model.safetensors"),
    )
    model = SliMMForConditionalGeneration.from_pretrained(d, torch_dtype="float32")
    torch.testing.assert_close(
        model.visual.blocks[0].attn.qkv.weight, state["visual.blocks.0.attn.qkv.weight"].float()
    )


def test_custom_visual_model_hub_id_says_download(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache, and no network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = shutil.copytree(demo_dir("plain"), tmp_path / "ckpt")
    edit_json(d / "config.json", vision_config=None, custom_visual_model="someone/some-vit")
    with pytest.raises(CheckpointError, match="download"):
        load_config(d)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing_config", "config.json: file not found"),
        ("bad_json", "config.json: not valid JSON"),
        ("no_weights", "no model.safetensors"),
        ("corrupt_weights", "model.safetensors"),
        ("missing_tensor", "missing tensors: model.layers.1.mlp.up_proj.weight"),
        ("unexpected_tensor", "unexpected tensors: model.extra.weight"),
        ("wrong_shape", "model.norm.weight has shape \\[7\\]"),
        ("bad_deepstack", "unknown deepstack_type 'fancy'"),
        ("bad_model_type", "model_type 'llama'"),
        ("truncated_weights", "model.safetensors"),
    ],
)
def test_broken_checkpoints_name_the_problem(demo_dir, tmp_path, damage, message):
    d = shutil.copytree(demo_dir("plain"), tmp_path / "ckpt")
    w = d / "model.safetensors"
    if damage == "missing_config":
        (d / "config.json").unlink()
    elif damage == "bad_json":
        (d / "config.json").write_text("{ not json")
    elif damage == "no_weights":
        w.unlink()
    elif damage == "corrupt_weights":
        w.write_bytes(b"\x00" * 64)
    elif damage == "truncated_weights":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif damage in ("missing_tensor", "unexpected_tensor", "wrong_shape"):
        state = load_file(w)
        if damage == "missing_tensor":
            del state["model.layers.1.mlp.up_proj.weight"]
        elif damage == "unexpected_tensor":
            state["model.extra.weight"] = torch.zeros(3)
        else:
            state["model.norm.weight"] = torch.zeros(7)
        save_file(state, str(w))
    elif damage == "bad_deepstack":
        edit_json(d / "config.json", use_deepstack=True, deepstack_type="fancy")
    elif damage == "bad_model_type":
        edit_json(d / "config.json", model_type="llama")
    with pytest.raises(CheckpointError, match=message):
        logits_of(d)


def test_special_token_ids_come_from_the_config(demo_dir, tmp_path):
    d = shutil.copytree(demo_dir("plain"), tmp_path / "ckpt")
    edit_json(d / "config.json", image_token_id=151650, vision_start_token_id=151649)
    edit_json(d / "generation_config.json", eos_token_id=[7, 8], pad_token_id=5)
    cfg = load_config(d)
    assert (cfg.image_token_id, cfg.vision_start_token_id, cfg.video_token_id) == (151650, 151649, 151656)
    assert cfg.eos_token_id == [7, 8] and cfg.pad_token_id == 5
    assert np.isfinite(logits_of(d).numpy()).all()


def test_unstated_tying_follows_the_weights(demo_dir, tmp_path):
    d = shutil.copytree(demo_dir("plain"), tmp_path / "ckpt")
    edit_json(d / "config.json", tie_word_embeddings=None)
    assert load_config(d).text.tie_word_embeddings is True  # no lm_head.weight: tied
    state = load_file(d / "model.safetensors")
    state["lm_head.weight"] = torch.zeros_like(state["model.embed_tokens.weight"])
    save_file(state, str(d / "model.safetensors"))
    assert load_config(d).text.tie_word_embeddings is False


def _normal_mode(path) -> int:
    from slimm.outdir import umask

    return (0o777 if path.is_dir() else 0o666) & ~umask()


def test_demo_checkpoint_files_follow_the_umask(tmp_path):
    """safetensors writes 0600; a model directory is readable like any other file the user writes."""
    from slimm.demo import write_demo_checkpoint

    out = write_demo_checkpoint(tmp_path / "ck")
    for p in [out, *out.iterdir()]:
        assert p.stat().st_mode & 0o777 == _normal_mode(p), p.name


def test_demo_checkpoint_replaces_its_own_and_refuses_other_directories(tmp_path):
    from slimm.demo import write_demo_checkpoint
    from slimm.errors import InputError

    out = write_demo_checkpoint(tmp_path / "ck", variant="plain")
    (out / "stale.txt").write_text("from before")
    write_demo_checkpoint(out, variant="v1")
    assert not (out / "stale.txt").exists() and load_config(out).deepstack_type == "v1"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="not empty"):
        write_demo_checkpoint(mine)
    assert (mine / "notes.txt").read_text() == "keep"
    write_demo_checkpoint(mine, overwrite=True)
    assert not (mine / "notes.txt").exists() and (mine / "model.safetensors").exists()
