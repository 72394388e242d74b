"""Checkpoint tensors -> model parameters: one explicit name map, every name and shape checked.

Reads model.safetensors or a sharded set (model.safetensors.index.json). A missing, unexpected or
mis-shaped tensor is an error naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from slimm.config import resolve_custom_visual_model
from slimm.errors import CheckpointError
from slimm.tensorfile import iter_tensors, read_header

# transformers >= 5 saves Qwen2-VL as model.language_model.* / model.visual.*; released SliMM
# checkpoints use the flat names. Both map onto the flat names.
PREFIX_MAP = (("model.language_model.", "model."), ("model.visual.", "visual."))
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")


def canonical_name(name: str) -> str:
    for old, new in PREFIX_MAP:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def safetensors_files(ckpt_dir: Path) -> list[Path]:
    index = ckpt_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [ckpt_dir / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
        return files
    single = ckpt_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"{ckpt_dir}: no model.safetensors or model.safetensors.index.json")


def read_tensors(ckpt_dir: Path) -> dict[str, tuple[Path, str]]:
    """Canonical tensor name -> (file, name in file), without loading data."""
    out: dict[str, tuple[Path, str]] = {}
    for f in safetensors_files(ckpt_dir):
        try:
            with safe_open(f, framework="pt") as sf:
                for key in sf.keys():
                    if key.endswith(IGNORED_SUFFIXES):
                        continue
                    out[canonical_name(key)] = (f, key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
    return out


def _visual_fallback(ckpt_dir: Path, custom: str) -> dict[str, tuple[Path, str]]:
    """Vision weights from a `custom_visual_model` directory, named visual.* or bare."""
    vdir = resolve_custom_visual_model(ckpt_dir, custom)
    out = {}
    for name, src in read_tensors(vdir).items():
        out[name if name.startswith("visual.") else "visual." + name] = src
    return out


def load_weights(model: nn.Module, ckpt_dir: str | Path, dtype: torch.dtype) -> None:
    """Fill `model` (built on the meta device) from the checkpoint, converting to `dtype`."""
    ckpt_dir = Path(ckpt_dir)
    cfg = model.config
    sources = read_tensors(ckpt_dir)
    if not any(n.startswith("visual.") for n in sources):
        custom = json.loads((ckpt_dir / "config.json").read_text()).get("custom_visual_model")
        if custom:
            sources.update(_visual_fallback(ckpt_dir, custom))
    if cfg.text.tie_word_embeddings:
        sources.pop("lm_head.weight", None)  # tied: the embedding is the output layer
    expected = {n: p.shape for n, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(sources))
    unexpected = sorted(set(sources) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(
            f"unexpected tensors: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else "")
        )
    if problems:
        hint = ""
        if any(".merger." in n for n in missing + unexpected):
            hint = f" (merger built for deepstack_type={cfg.deepstack_type!r}; does config.json match the weights?)"
        raise CheckpointError(f"{ckpt_dir}: " + "; ".join(problems) + hint)

    state = {}
    by_file: dict[Path, dict[str, str]] = {}
    for name in expected:
        f, key = sources[name]
        by_file.setdefault(f, {})[key] = name
    for f, names in by_file.items():
        header, _ = read_header(f)
        for key, name in names.items():
            got = tuple(header[key]["shape"])
            if got != tuple(expected[name]):
                raise CheckpointError(
                    f"{f}: tensor {key} has shape {list(got)}, the model expects {list(expected[name])}"
                )
        # plain reads into ordinary memory, not safetensors' mapped file (see slimm.tensorfile)
        for key, kind, arr in iter_tensors(f, names):
            t = torch.from_numpy(arr)
            state[names[key]] = (t.view(torch.bfloat16) if kind == "BF16" else t).to(dtype)
    model.load_state_dict(state, assign=True, strict=True)
    for m in model.modules():
        if hasattr(m, "init_buffers"):
            m.init_buffers(device="cpu")
