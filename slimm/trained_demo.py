"""The trained demo model shipped inside the package (slimm/assets/demo-model/): `pack` squeezes a
checkpoint written by slimm.train_demo into it, `trained_demo_dir` unpacks it into the cache on
first use (whole or not at all, checked against the packed checksum). No download.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save, save_file

from slimm.cache import cache_dir
from slimm.errors import CheckpointError

ASSET_DIR = Path(__file__).parent / "assets" / "demo-model"
WEIGHTS = "weights.safetensors.xz"
EMBED = "model.embed_tokens.weight"
TOKEN_IDS = "token_ids"  # in the packed file: the real ids of the embedding rows kept
SMALL_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "chat_template.json",
    "README.md",
    "training.json",
)
# questions about the one shipped scene (these three types draw the same scene for an index; a
# "describe" sample draws its own)
EXAMPLE_QUESTIONS = ("colour", "position", "shape")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pack(ckpt_dir: str | Path, asset_dir: str | Path = ASSET_DIR, example_seed: int = 0) -> Path:
    """Pack a trained demo checkpoint: its small JSON files, the weights with only the non-zero
    embedding rows (and their ids), xz-compressed, an example scene, and a manifest holding the
    checksum of the model.safetensors that unpacking must rebuild. Returns `asset_dir`."""
    ckpt_dir, asset_dir = Path(ckpt_dir), Path(asset_dir)
    state = load_file(ckpt_dir / "model.safetensors")
    embed = state[EMBED]
    keep = (embed != 0).any(dim=1).nonzero().squeeze(1)
    packed = {
        **{k: v for k, v in state.items() if k != EMBED},
        EMBED: embed[keep].contiguous(),
        TOKEN_IDS: keep,
    }
    tmp = asset_dir.with_name(asset_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / WEIGHTS).write_bytes(lzma.compress(save(packed), preset=9 | lzma.PRESET_EXTREME))
    for name in SMALL_FILES:
        if (ckpt_dir / name).exists():
            shutil.copyfile(ckpt_dir / name, tmp / name)
    samples = example_samples(example_seed)
    examples = [{"image": "example.png", "question": x.question, "answer": x.answer} for x in samples]
    samples[0].image.save(tmp / "example.png")
    manifest = {
        "format": 1,
        "vocab_size": int(embed.shape[0]),
        "model_sha256": _sha256(ckpt_dir / "model.safetensors"),
        "examples": examples,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if asset_dir.exists():
        shutil.rmtree(asset_dir)
    tmp.rename(asset_dir)
    return asset_dir


def example_samples(seed: int = 0) -> list:
    """The shipped example: the first scene of the example stream with two shapes, and a question
    of each EXAMPLE_QUESTIONS type about it (checked to be the same picture)."""
    from slimm.synthetic import make_sample

    for index in range(100):
        samples = [make_sample(seed, index, "example", q) for q in EXAMPLE_QUESTIONS]
        if len(samples[0].shapes) == 2:
            break
    pixels = {s.image.tobytes() for s in samples}
    assert len(pixels) == 1, "the example questions must be about one scene"
    return samples


def read_manifest(asset_dir: Path = ASSET_DIR) -> dict:
    path = asset_dir / "manifest.json"
    if not path.is_file() or not (asset_dir / WEIGHTS).is_file():
        raise CheckpointError(
            f"{asset_dir}: the trained demo model is not in this installation (no {path.name} / {WEIGHTS}); "
            "reinstall slimm, or build it with `python -m slimm.train_demo --out DIR --package "
            f"{asset_dir}`"
        )
    return json.loads(path.read_text())


def example_image(asset_dir: Path = ASSET_DIR) -> Path:
    """The shipped example scene (its questions and answers are in the manifest's `examples`)."""
    return asset_dir / "example.png"


def unpack(asset_dir: Path, out: Path) -> Path:
    """Rebuild the full checkpoint directory `out` from the packed asset (atomically)."""
    from slimm.demo import copy_tokenizer

    manifest = read_manifest(asset_dir)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        try:
            packed = load(lzma.decompress((asset_dir / WEIGHTS).read_bytes()))
        except Exception as e:  # lzma.LZMAError, or safetensors' own error type
            raise CheckpointError(f"{asset_dir / WEIGHTS}: cannot be read ({e}); reinstall slimm") from None
        ids = packed.pop(TOKEN_IDS)
        rows = packed.pop(EMBED)
        embed = torch.zeros((manifest["vocab_size"], rows.shape[1]), dtype=rows.dtype)
        embed[ids] = rows
        save_file({**packed, EMBED: embed}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        got = _sha256(tmp / "model.safetensors")
        if got != manifest["model_sha256"]:
            raise CheckpointError(
                f"{asset_dir}: the unpacked demo weights do not match their checksum "
                f"({got[:12]} != {manifest['model_sha256'][:12]}); reinstall slimm"
            )
        for name in SMALL_FILES:
            if (asset_dir / name).exists():
                shutil.copyfile(asset_dir / name, tmp / name)
        copy_tokenizer(tmp)
        if _complete(out):  # another process finished first: keep its copy
            return out
        if out.exists():
            shutil.rmtree(out)  # a leftover from an older layout
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def trained_demo_dir(asset_dir: str | Path = ASSET_DIR) -> Path:
    """The trained demo checkpoint directory, unpacked into the cache on first use. The directory
    name carries the weights' checksum, so an upgraded package unpacks its own model."""
    asset_dir = Path(asset_dir)
    manifest = read_manifest(asset_dir)
    out = cache_dir() / f"demo-trained-{manifest['model_sha256'][:12]}"
    if _complete(out):
        return out
    try:
        return unpack(asset_dir, out)
    except OSError:
        # another process may have unpacked it at the same moment: use its copy if it is whole
        if _complete(out):
            return out
        raise


def _complete(out: Path) -> bool:
    # unpack renames a finished directory into place, so these two mean the whole of it is there
    return (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
