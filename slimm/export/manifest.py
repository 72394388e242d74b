"""The export directory's contract, torch-free: the part names, each part's inputs and outputs,
and reading + checking manifest.json. Every runtime (ONNX Runtime, JAX, Paddle, MindSpore) uses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimm.config import SliMMConfig
from slimm.errors import CheckpointError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
PARTS = ("A", "B", "C", "D", "E", "F")
PART_ROLES = {
    "A": "token embedding",
    "B": "vision encoder",
    "C": "multimodal fusion",
    "D": "M-RoPE cos/sin for prompts with images",
    "E": "rotary cos/sin for text-only prompts and decode steps",
    "F": "LLM decoder with KV cache, DeepStack and lm_head",
}


def part_file(part: str) -> str:
    return f"SliMM_{part}.onnx"


# ---- I/O contract -----------------------------------------------------------------------------------
@dataclass
class Tensor:
    name: str
    dtype: str  # float32 | float16 | int64
    dims: list  # ints or symbolic names
    role: str

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": self.dims, "role": self.role}


def io_spec(cfg: SliMMConfig, part: str, float_type: str) -> tuple[list[Tensor], list[Tensor]]:
    """Inputs and outputs of one part: names, dtypes, symbolic dims, roles (written to the manifest)."""
    t, v = cfg.text, cfg.vision
    d, hd, kv = t.hidden_size, t.head_dim, t.num_key_value_heads
    f = float_type
    if part == "A":
        return [Tensor("input_ids", "int64", ["batch", "seq"], "token ids")], [
            Tensor("inputs_embeds", f, ["batch", "seq", d], "token embeddings")
        ]
    if part == "B":
        # sizes are multiples of the merged-token count, so compilers that check shapes
        # symbolically (jax.export) can prove every reshape: rows = 4 L, tower patches = 4 L or 16 L
        scale = 2 if cfg.deepstack_type == "efficient" else 1
        patches = "16*tokens" if scale == 2 else "4*tokens"
        row = v.in_channels * v.temporal_patch_size * (scale * v.patch_size) ** 2
        ins = [
            Tensor("pixel_values", "float32", ["4*tokens", row], "patch rows from the image processor"),
            Tensor("rotary_ids", "int64", [patches, 2], "(row, col) of each tower patch, merge-window order"),
            Tensor("frame_ids", "int64", [patches], "frame of each tower patch: attention stays within one"),
        ]
        if cfg.deepstack_type == "efficient":
            ins += [
                Tensor("pixel_index", "int64", ["4*tokens"], "processor rows back to raster order"),
                Tensor(
                    "coarse_index", "int64", ["4*tokens"], "merge windows grouped 2x2 for the coarse tokens"
                ),
            ]
        outs = [Tensor("visual_embeds", f, ["tokens", d], "visual tokens for the LLM sequence")]
        if cfg.use_deepstack:
            outs.append(Tensor("deepstack", f, [cfg.num_deepstack, "tokens", d], "DeepStack slices"))
        return ins, outs
    if part == "C":
        return [
            Tensor("inputs_embeds", f, ["batch", "seq", d], "token embeddings (from A)"),
            Tensor("visual_embeds", f, ["visual_tokens", d], "visual tokens (from B)"),
            Tensor("visual_pos", "int64", ["visual_tokens"], "flat index b*seq+s of each visual token"),
        ], [Tensor("fused_embeds", f, ["batch", "seq", d], "embeddings with visual tokens written in")]
    if part in ("D", "E"):
        pos_dims = [3, "batch", "seq"] if part == "D" else ["batch", "seq"]
        return [
            Tensor("position_ids", "int64", pos_dims, "M-RoPE (t, h, w) rows" if part == "D" else "positions")
        ], [
            Tensor("cos", f, ["batch", "seq", hd], "rotary cos"),
            Tensor("sin", f, ["batch", "seq", hd], "rotary sin"),
        ]
    if part == "F":
        ins = [
            Tensor("inputs_embeds", f, ["batch", "seq", d], "embeddings of the current tokens"),
            Tensor("cos", f, ["batch", "seq", hd], "rotary cos (D or E)"),
            Tensor("sin", f, ["batch", "seq", hd], "rotary sin (D or E)"),
            Tensor("past_mask", "int64", ["batch", "capacity"], "1 where a cache slot holds a real token"),
            Tensor("cur_mask", "int64", ["batch", "seq"], "1 for real current tokens, 0 for left padding"),
        ]
        n = t.num_hidden_layers
        ins += [
            Tensor(f"past_key.{i}", f, ["batch", kv, "capacity", hd], "key cache buffer") for i in range(n)
        ]
        ins += [
            Tensor(f"past_value.{i}", f, ["batch", kv, "capacity", hd], "value cache buffer")
            for i in range(n)
        ]
        if cfg.use_deepstack:
            ins += [
                Tensor(
                    "deepstack",
                    f,
                    [cfg.num_deepstack, "visual_tokens", d],
                    "DeepStack slices (empty in decode)",
                ),
                Tensor("visual_pos", "int64", ["visual_tokens"], "flat index b*seq+s of each visual token"),
            ]
        outs = [
            Tensor("logits", "float32", ["batch", t.vocab_size], "logits of the last position"),
            Tensor("next_token", "int64", ["batch"], "greedy argmax of logits"),
        ]
        outs += [Tensor(f"present_key.{i}", f, ["batch", kv, "seq", hd], "new keys, to write at the cache offset")
                 for i in range(n)]  # fmt: skip
        outs += [Tensor(f"present_value.{i}", f, ["batch", kv, "seq", hd], "new values") for i in range(n)]
        return ins, outs
    raise ValueError(f"unknown part {part!r}; parts are {PARTS}")


def read_manifest(export_dir: str | Path, fmt: str = "slimm-onnx") -> dict[str, Any]:
    """manifest.json of an export (or converted) directory, checked for what every runtime needs."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST
    if not export_dir.is_dir():
        raise CheckpointError(f"{export_dir}: directory not found")
    if not path.exists():
        raise CheckpointError(f"{path}: not found; is {export_dir} an export directory (`slimm export`)?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{path}: format is {got!r}, expected {fmt!r}")
    if manifest.get("version") != MANIFEST_VERSION:
        raise CheckpointError(
            f"{path}: manifest version {manifest.get('version')!r}; this slimm reads version {MANIFEST_VERSION}"
        )
    for key in ("model", "parts", "export_id", "max_seq_len"):
        if key not in manifest:
            raise CheckpointError(f"{path}: no {key!r} entry")
    missing = [p for p in PARTS if p not in manifest["parts"]]
    if missing:
        raise CheckpointError(f"{path}: parts {', '.join(missing)} are not listed")
    try:
        manifest["config"] = SliMMConfig.from_dict(manifest["model"])
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: model settings unreadable ({e})") from None
    return manifest
