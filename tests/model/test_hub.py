"""Hub ids (`owner/name`) resolved through a fake Hugging Face cache built from a demo checkpoint:
the same tokens as the directory, offline, and one clear error for each way it can fail. No network."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import slimm
from slimm.cli import main
from slimm.errors import CheckpointError, InputError
from slimm.hub import download_command
from slimm.model.processor import SliMMQwen2VLProcessor
from slimm.model.slimm import SliMMForConditionalGeneration

REPO = "menglc/SliMM-Demo"
VISION = "menglc/DFN-Huge-Qwen2VL-7B"  # what the released qwen2 checkpoints name their tower
REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty Hugging Face cache in HF_HOME, offline: nothing here can reach the network."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    return home


def cache_repo(hf_home, repo_id, src, rev=REV):
    """Lay out `src` as huggingface_hub does: blobs by hash, snapshots/<rev>/ of symlinks, refs/main."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / rev / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)  # no newline, as huggingface_hub writes it
    return repo


def sharded(src, dst):
    """`src` with its weights in two safetensors shards and model.safetensors.index.json."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(dst / fname))
        weight_map.update(dict.fromkeys(keys, fname))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def split_vision_tower(src, dst, vision_dir):
    """A qwen2-style checkpoint: no vision_config, `custom_visual_model` names the tower, whose config
    and weights (bare names) live in `vision_dir`."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    vision_dir.mkdir(parents=True)
    (vision_dir / "config.json").write_text(json.dumps(cfg.pop("vision_config")))
    cfg["custom_visual_model"] = VISION
    (dst / "config.json").write_text(json.dumps(cfg))
    state = load_file(dst / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("visual.")}, str(dst / "model.safetensors"))
    save_file(
        {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")},
        str(vision_dir / "model.safetensors"),
    )
    return dst


def greedy(model_or_dir, prompt=(1, 2, 3, 151644, 9), n=4):
    model = SliMMForConditionalGeneration.from_pretrained(model_or_dir, torch_dtype="float32")
    ids = torch.tensor([list(prompt)])
    return model.generate(input_ids=ids, max_new_tokens=n, eos_token_id=[])[0, ids.shape[1] :].tolist()


def test_hub_id_gives_the_same_tokens_as_the_directory(demo_dir, hf_home, tmp_path):
    # bf16 and sharded, as the released checkpoints are
    src = demo_dir("plain")
    cache_repo(hf_home, REPO, sharded(src, tmp_path / "sharded"))
    assert greedy(REPO) == greedy(src)
    # slimm.load: the backend interface
    ids = torch.tensor([[1, 2, 3, 151644, 9]])
    via_id = slimm.load(REPO, dtype="float32").generate(input_ids=ids, max_new_tokens=4, eos_token_id=[])
    via_dir = slimm.load(src, dtype="float32").generate(input_ids=ids, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(torch.as_tensor(via_id), torch.as_tensor(via_dir))
    # the original API's processor
    proc = SliMMQwen2VLProcessor.from_pretrained(REPO)
    assert proc.tokenizer is not None and proc.tokenizer.encode("a red square") == (
        SliMMQwen2VLProcessor.from_pretrained(src).tokenizer.encode("a red square")
    )


def test_custom_visual_model_hub_id_resolves_from_the_cache(demo_dir, hf_home, tmp_path):
    src = demo_dir("plain")
    ckpt = split_vision_tower(src, tmp_path / "ckpt", tmp_path / "vision")
    cache_repo(hf_home, VISION, tmp_path / "vision", rev="f" * 40)
    assert greedy(ckpt) == greedy(src)
    cache_repo(hf_home, REPO, ckpt)  # the checkpoint itself by hub id too
    assert greedy(REPO) == greedy(src)


def test_missing_vision_tower_advice_works_when_followed(demo_dir, hf_home, tmp_path):
    src = demo_dir("plain")
    ckpt = split_vision_tower(src, tmp_path / "ckpt", tmp_path / "vision")
    with pytest.raises(CheckpointError) as e:
        greedy(ckpt)
    msg = str(e.value)
    assert "\n" not in msg and VISION in msg and download_command(VISION) in msg
    local = re.search(r"--local-dir (\S+?)`", msg).group(1)
    shutil.copytree(tmp_path / "vision", local)  # what `... --local-dir <that>` would leave there
    assert greedy(ckpt) == greedy(src)


def test_hub_id_not_cached_offline_is_one_clear_error(hf_home):
    with pytest.raises(CheckpointError) as e:
        slimm.load("nobody/not-cached")
    msg = str(e.value)
    assert "\n" not in msg and "'nobody/not-cached'" in msg and "HF_HUB_OFFLINE" in msg
    assert f"`{download_command('nobody/not-cached')}`" in msg
    with pytest.raises(CheckpointError, match="nobody/not-cached"):
        SliMMForConditionalGeneration.from_pretrained("nobody/not-cached")


@pytest.mark.parametrize("bad", ["owner/bad name", "owner/name.git", "-owner/name", "owner/" + "x" * 100])
def test_invalid_hub_id_is_an_input_error(hf_home, bad):
    with pytest.raises(InputError, match=re.escape(repr(bad))):
        slimm.load(bad)


def test_refs_main_naming_a_missing_snapshot(demo_dir, hf_home):
    repo = cache_repo(hf_home, REPO, demo_dir("plain"))
    (repo / "refs" / "main").write_text("e" * 40)
    with pytest.raises(CheckpointError) as e:
        slimm.load(REPO)
    msg = str(e.value)
    assert "\n" not in msg and REPO in msg and "refs/main" in msg and "e" * 40 in msg
    assert download_command(REPO) in msg


def test_download_failure_is_one_line_not_a_traceback(hf_home, monkeypatch):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise OSError("Connection refused\nmore detail")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(CheckpointError) as e:
        slimm.load("nobody/unreachable")
    msg = str(e.value)
    assert "\n" not in msg and "Connection refused" in msg and download_command("nobody/unreachable") in msg


def test_local_directories_win_and_missing_paths_keep_their_message(demo_dir, tmp_path, monkeypatch, hf_home):
    # a directory that happens to look like owner/name is used as is, no hub lookup
    monkeypatch.chdir(tmp_path)
    shutil.copytree(demo_dir("plain"), tmp_path / "owner" / "name")
    assert greedy("owner/name") == greedy(demo_dir("plain"))
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        slimm.load(tmp_path / "nowhere" / "at" / "all")


def test_cli_generate_with_a_hub_id_offline(demo_dir, hf_home, capsys):
    cache_repo(hf_home, REPO, demo_dir("plain"))
    args = ["generate", "--prompt", "Hi", "--max-new-tokens", "3", "--stop-token", "0", "--dtype", "float32"]
    assert main([*args, "--model", REPO]) == 0
    via_id = capsys.readouterr().out
    assert main([*args, "--model", str(demo_dir("plain"))]) == 0
    assert capsys.readouterr().out == via_id
    assert main([*args, "--model", "nobody/not-cached"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and "nobody/not-cached" in err
        and download_command("nobody/not-cached") in err
    )
