"""Reference side of the parity tests: tiny seeded transformers Qwen2-VL models and hand-built inputs.

Owns the tiny config, the seeded weights, the writer of released-format (transformers 4.45-era,
flat `model.*` / `visual.*` names) SliMM checkpoints, the hand-made model inputs and the error metric.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prompts import ASSISTANT, ENDOFTEXT, IM_END, IM_START, USER, left_pad
from prompts import IMG as IMAGE_PAD
from prompts import NL as NEWLINE
from prompts import VE as VISION_END
from prompts import VID as VIDEO_PAD
from prompts import VS as VISION_START
from safetensors.torch import save_file
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

# Qwen2 tokenizer ids (real ones, so the checkpoint's token-id fields are the released values)
SYSTEM = 8948  # "system"
EOS_IDS = [IM_END, ENDOFTEXT]
PAD_ID = ENDOFTEXT  # also the pad token

PATCH, MERGE, TEMPORAL, CHANNELS = 14, 2, 2, 3
PATCH_DIM = CHANNELS * TEMPORAL * PATCH * PATCH  # 1176 values per pixel_values row

TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,  # real vocab so the special ids above are valid
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # head_dim 16, grouped-query attention with 2 groups
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "rope_theta": 1e6,
    "mrope_section": [2, 3, 3],  # 2 * sum == head_dim 16
    "hidden_act": "silu",
}
VISION_DEFAULTS: dict[str, Any] = {
    "depth": 2,
    "embed_dim": 32,
    "num_heads": 2,  # vision head_dim 16
    "mlp_ratio": 2,  # not the default 4, so a hard-coded ratio shows up as a shape error
    "hidden_act": "quick_gelu",
    "in_channels": CHANNELS,
    "patch_size": PATCH,
    "spatial_merge_size": MERGE,
    "temporal_patch_size": TEMPORAL,
}


def tiny_qwen2vl_config(
    tie_word_embeddings: bool = True, vision_config: dict[str, Any] | None = None, **text_overrides: Any
) -> Qwen2VLConfig:
    """A tiny Qwen2-VL config: LLM hidden 64, 3 layers, 4 heads / 2 KV heads; ViT depth 2, width 32.

    Keyword overrides go to the LLM settings (`num_hidden_layers=4`, `mrope_section=[4, 2, 2]`, ...);
    `vision_config={...}` overrides the tower's. `vision_config.hidden_size` always follows the LLM width.
    """
    text = {**TEXT_DEFAULTS, **text_overrides}
    vision = {**VISION_DEFAULTS, **(vision_config or {}), "hidden_size": text["hidden_size"]}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    if 2 * sum(text["mrope_section"]) != head_dim:
        raise ValueError(f"mrope_section {text['mrope_section']} does not fit head_dim {head_dim}")
    rope = {
        "rope_type": "default",
        "mrope_section": list(text.pop("mrope_section")),
        "rope_theta": text.pop("rope_theta"),
    }
    config = Qwen2VLConfig(
        text_config={
            **text,
            "rope_parameters": rope,
            "bos_token_id": ENDOFTEXT,
            "eos_token_id": IM_END,
            "pad_token_id": PAD_ID,
        },
        vision_config=vision,
        tie_word_embeddings=tie_word_embeddings,
    )
    config._attn_implementation = "eager"  # plain matmul/softmax: deterministic on CPU and easy to hook
    return config


@torch.no_grad()
def make_hf_model(config: Qwen2VLConfig, seed: int = 0) -> Qwen2VLForConditionalGeneration:
    """A transformers Qwen2-VL with seeded random weights, fp32, eval mode, eager attention.

    Weights are scaled so activations stay O(1) (Linear std 1/sqrt(fan_in)): attention scores are O(1),
    so a position (RoPE) or masking bug moves the logits by far more than the test tolerance. Biases and
    norm weights are random too (norm weights around 1), so a dropped bias or norm is visible.
    """
    config._attn_implementation = "eager"
    model = Qwen2VLForConditionalGeneration(config)
    model.to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)

    def randn(shape: Sequence[int]) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    seen: set[int] = set()
    for name, param in model.named_parameters():  # tied lm_head is the embedding: listed once
        if id(param) in seen:
            continue
        seen.add(id(param))
        shape = tuple(param.shape)
        if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            # small enough that a tied model does not just repeat its input token, large enough for
            # well-separated top logits (see the tie guard in the generate tests)
            value = randn(shape) * 0.2
        elif name.endswith("patch_embed.proj.weight"):
            value = randn(shape) / math.sqrt(math.prod(shape[1:]))
        elif re.search(r"(norm\d?|ln_q|layernorm|\.norm)\.weight$", name):
            value = 1.0 + 0.2 * randn(shape)
        elif name.endswith(".bias"):
            value = 0.1 * randn(shape)
        elif param.ndim == 2:
            value = randn(shape) / math.sqrt(shape[1])
        else:
            raise AssertionError(f"no init rule for {name} {shape}")
        param.copy_(value)
    model.generation_config.eos_token_id = EOS_IDS
    model.generation_config.pad_token_id = PAD_ID
    return model


# ---------------------------------------------------------------------------------------------------
# Checkpoint in the released SliMM / Qwen2-VL format


def hf_to_slimm_name(name: str) -> str:
    """transformers 5 parameter name -> released (4.45-era) checkpoint name."""
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if name.startswith(new):
            return old + name[len(new) :]
    if name == "lm_head.weight":
        return name
    raise KeyError(f"unexpected transformers parameter {name}")


def slimm_to_hf_name(name: str) -> str:
    """Released checkpoint name -> transformers 5 parameter name (inverse of `hf_to_slimm_name`)."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model.") :]
    if name == "lm_head.weight":
        return name
    raise KeyError(f"unexpected checkpoint tensor {name}")


def slimm_state_dict(hf_model: Qwen2VLForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The model's weights under released names; `lm_head.weight` only when not tied."""
    tied = bool(hf_model.config.tie_word_embeddings)
    out = {}
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        out[hf_to_slimm_name(name)] = tensor.detach().to(torch.float32).contiguous().clone()
    return out


def slimm_config_dict(config: Qwen2VLConfig, deepstack: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json as the released checkpoints write it: flat LLM fields, rope_scaling, vision_config."""
    text, vision = config.text_config, config.vision_config
    rope = text.rope_parameters
    cfg = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "attention_dropout": 0.0,
        "bos_token_id": ENDOFTEXT,
        "eos_token_id": IM_END,
        "hidden_act": text.hidden_act,
        "hidden_size": text.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "max_window_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": rope["rope_theta"],
        "rope_scaling": {"type": "mrope", "mrope_section": list(rope["mrope_section"])},
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "torch_dtype": "float32",
        "transformers_version": "4.45.0.dev0",
        "use_cache": True,
        "vocab_size": text.vocab_size,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
        "vision_token_id": 151654,
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "vision_config": {
            "depth": vision.depth,
            "embed_dim": vision.embed_dim,
            "hidden_size": vision.hidden_size,
            "hidden_act": vision.hidden_act,
            "mlp_ratio": vision.mlp_ratio,
            "num_heads": vision.num_heads,
            "in_channels": vision.in_channels,
            "patch_size": vision.patch_size,
            "spatial_merge_size": vision.spatial_merge_size,
            "temporal_patch_size": vision.temporal_patch_size,
        },
        "use_deepstack": False,
    }
    if deepstack:
        cfg.update({k: v for k, v in deepstack.items() if k != "tensors"}, use_deepstack=True)
    return cfg


def save_as_slimm_checkpoint(
    hf_model: Qwen2VLForConditionalGeneration, out_dir: str | Path, deepstack: dict[str, Any] | None = None
) -> Path:
    """Write config.json, generation_config.json and model.safetensors in the released SliMM format.

    `deepstack`, when given, is `{"deepstack_type": ..., <other config fields>, "tensors": {name: tensor}}`:
    the fields go into both JSON files with `use_deepstack: true`, the tensors (released names, e.g.
    `visual.merger.mlp_deepstack.0.weight`) are added to the safetensors file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = slimm_config_dict(hf_model.config, deepstack)
    gen = {
        "bos_token_id": ENDOFTEXT,
        "eos_token_id": list(EOS_IDS),
        "pad_token_id": PAD_ID,
        "top_k": 1,
        "use_deepstack": cfg["use_deepstack"],
        "deepstack_type": cfg.get("deepstack_type"),
        "spatial_merge_size": MERGE,
        "temporal_patch_size": TEMPORAL,
        "use_mrope": True,
        "custom_visual_model": None,
        "global_interval": None,
        "local_splits_per_side": 4,
        "transformers_version": "4.45.0.dev0",
    }
    tensors = slimm_state_dict(hf_model)
    for name, tensor in ((deepstack or {}).get("tensors") or {}).items():
        if name in tensors:
            raise KeyError(f"deepstack tensor {name} clashes with a base tensor")
        tensors[name] = tensor.detach().to(torch.float32).contiguous().clone()
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


@torch.no_grad()
def load_slimm_checkpoint_into_hf(ckpt_dir: str | Path) -> Qwen2VLForConditionalGeneration:
    """Rebuild a transformers model from a released-format checkpoint with the explicit inverse name map.

    Every tensor must land on a parameter and every parameter must be filled (strict), so it checks the
    writer's names as well as its values.
    """
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    cfg = json.loads((ckpt_dir / "config.json").read_text(encoding="utf-8"))
    config = tiny_qwen2vl_config(
        tie_word_embeddings=cfg["tie_word_embeddings"],
        vision_config={k: v for k, v in cfg["vision_config"].items() if k != "hidden_size"},
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg["rope_theta"],
        mrope_section=cfg["rope_scaling"]["mrope_section"],
    )
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    state = {slimm_to_hf_name(k): v for k, v in load_file(str(ckpt_dir / "model.safetensors")).items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


# ---------------------------------------------------------------------------------------------------
# Inputs built by hand (no processor)


@dataclass(frozen=True)
class Text:
    n: int  # ordinary (non-special) token ids


@dataclass(frozen=True)
class Image:
    grid: tuple[int, int, int]  # (t, h, w) in 14-px patches; t = 1 for a still image


@dataclass(frozen=True)
class Video:
    grid: tuple[int, int, int]  # (t, h, w); t counts pairs of frames


def vision_tokens(grid: tuple[int, int, int]) -> int:
    t, h, w = grid
    if h % MERGE or w % MERGE:
        raise ValueError(f"grid {grid}: h and w must be multiples of {MERGE}")
    return t * h * w // (MERGE * MERGE)


def chat_prompt(content: Sequence[Text | Image | Video], gen: torch.Generator) -> list[int]:
    """Token ids in the Qwen2-VL chat layout; each image/video is <|vision_start|> pads <|vision_end|>."""

    def words(n: int) -> list[int]:
        return torch.randint(1000, 150000, (n,), generator=gen).tolist()  # ordinary BPE ids

    ids = [IM_START, SYSTEM, NEWLINE, *words(5), IM_END, NEWLINE, IM_START, USER, NEWLINE]
    for item in content:
        if isinstance(item, Text):
            ids += words(item.n)
        else:
            pad = IMAGE_PAD if isinstance(item, Image) else VIDEO_PAD
            ids += [VISION_START, *[pad] * vision_tokens(item.grid), VISION_END]
    ids += [IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE]
    return ids


def build_inputs(prompts: Sequence[Sequence[Text | Image | Video]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs for a batch of chat prompts, left-padded with <|endoftext|> (mask 0).

    Returns input_ids, attention_mask and, when present, pixel_values + image_grid_thw and
    pixel_values_videos + video_grid_thw (rows of all images in batch-then-prompt order, N(0, 1) values).
    transformers >= 5 also wants `mm_token_type_ids`: add it with `hf_inputs(...)`.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = [chat_prompt(p, gen) for p in prompts]
    input_ids, attention_mask = left_pad(rows)  # PAD_ID is the pad token there too
    out: dict[str, torch.Tensor] = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
    }
    for kind, key, grid_key in (
        (Image, "pixel_values", "image_grid_thw"),
        (Video, "pixel_values_videos", "video_grid_thw"),
    ):
        grids = [item.grid for p in prompts for item in p if isinstance(item, kind)]
        if grids:
            n_rows = sum(math.prod(g) for g in grids)
            out[key] = torch.randn(n_rows, PATCH_DIM, generator=gen, dtype=torch.float32)
            out[grid_key] = torch.tensor(grids, dtype=torch.long)
    return out


def mm_token_type_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """transformers 5's modality map: 0 text, 1 image pad, 2 video pad (its processor returns this)."""
    return (input_ids == IMAGE_PAD).long() + 2 * (input_ids == VIDEO_PAD).long()


def hf_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same inputs for transformers' Qwen2-VL, which needs `mm_token_type_ids` to build M-RoPE ids."""
    return {**inputs, "mm_token_type_ids": mm_token_type_ids(inputs["input_ids"])}


# ---------------------------------------------------------------------------------------------------
# Comparison


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor, attention_mask: torch.Tensor | None = None) -> float:
    """max|ours - ref| / max|ref| over valid positions (attention_mask 1) of [B, S, ...] tensors."""
    if ours.shape != ref.shape:
        raise AssertionError(f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}")
    ours, ref = ours.detach().double(), ref.detach().double()
    if attention_mask is not None:
        keep = attention_mask.bool()
        ours, ref = ours[keep], ref[keep]
    return float((ours - ref).abs().max() / ref.abs().max())


def worst_position(ours: torch.Tensor, ref: torch.Tensor, attention_mask: torch.Tensor | None = None) -> str:
    """Where [B, S, V] logits differ most, in words, for assertion messages."""
    diff = (ours.detach().double() - ref.detach().double()).abs().amax(-1)  # (B, S)
    if attention_mask is not None:
        diff = diff.masked_fill(~attention_mask.bool(), -1.0)
    b, s = divmod(int(diff.argmax()), diff.shape[1])
    first = (diff > 1e-4 * ref.abs().max()).nonzero()
    first_txt = f"; first bad position (b={int(first[0, 0])}, s={int(first[0, 1])})" if len(first) else ""
    return f"worst at (b={b}, s={s}) |diff|={float(diff[b, s]):.3e}, max|ref|={float(ref.abs().max()):.3e}{first_txt}"


def top2_gap(logits: torch.Tensor) -> torch.Tensor:
    """Gap between the largest and second-largest logit along the last axis."""
    top = logits.detach().double().topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


@torch.no_grad()
def hf_trace(
    model: Qwen2VLForConditionalGeneration, inputs: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Intermediate tensors of one transformers forward, to find where another implementation departs.

    Keys: `vision.block.{i}` (tower block outputs, all images/videos of the call in order, [N, c]),
    `vision.merger` ([L, d]), `llm.position_ids` ([3, B, S]), `llm.inputs_embeds` (after the visual
    scatter, [B, S, d]), `llm.layer.{i}` (decoder layer outputs), `llm.norm`, `logits`.
    """
    out: dict[str, torch.Tensor] = {}
    handles = []
    visual, lm = model.model.visual, model.model.language_model

    def keep(key: str):
        def hook(_module, _args, output):
            value = output[0] if isinstance(output, tuple) else output
            # images and videos go through the tower in separate calls: concatenate them in call order
            out[key] = (
                torch.cat([out[key], value]) if key in out and key.startswith("vision") else value.clone()
            )

        return hook

    def lm_inputs(_module, _args, kwargs):
        out["llm.inputs_embeds"] = kwargs["inputs_embeds"].clone()

    def rope_positions(_module, args):
        # what the rotary embedding really gets ([3, B, S]), also when the text model made it itself
        out["llm.position_ids"] = args[1].expand(3, -1, -1).clone()

    for i, blk in enumerate(visual.blocks):
        handles.append(blk.register_forward_hook(keep(f"vision.block.{i}")))
    handles.append(visual.merger.register_forward_hook(keep("vision.merger")))
    handles.append(lm.register_forward_pre_hook(lm_inputs, with_kwargs=True))
    handles.append(lm.rotary_emb.register_forward_pre_hook(rope_positions))
    for i, layer in enumerate(lm.layers):
        handles.append(layer.register_forward_hook(keep(f"llm.layer.{i}")))
    handles.append(lm.norm.register_forward_hook(keep("llm.norm")))
    try:
        out["logits"] = model(**hf_inputs(inputs)).logits
    finally:
        for h in handles:
            h.remove()
    return out


def original_rope_index(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """M-RoPE position ids [3, B, S] by the original SliMM / Qwen2-VL rule, written independently.

    Text counts up in all three rows; a visual block of LLM grid (t, h/m, w/m) starting after `s`
    positions gets (t_idx + s, h_idx + s, w_idx + s); text after it resumes at (max so far) + 1.
    Padding (mask 0) is skipped and gets position 1, as in the original.
    """
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    grids = {
        IMAGE_PAD: iter(
            (inputs.get("image_grid_thw") if "image_grid_thw" in inputs else torch.zeros(0, 3)).tolist()
        ),
        VIDEO_PAD: iter(
            (inputs.get("video_grid_thw") if "video_grid_thw" in inputs else torch.zeros(0, 3)).tolist()
        ),
    }
    pos = torch.ones(3, *input_ids.shape, dtype=torch.long)
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][mask[b].bool()].tolist()
        rows: list[list[int]] = [[], [], []]
        nxt, i = 0, 0
        while i < len(ids):
            if ids[i] in (IMAGE_PAD, VIDEO_PAD):
                t, h, w = (int(x) for x in next(grids[ids[i]]))
                h, w = h // MERGE, w // MERGE
                for ti in range(t):
                    for hi in range(h):
                        for wi in range(w):
                            for r, v in zip(rows, (ti, hi, wi), strict=True):
                                r.append(nxt + v)
                i += t * h * w
                nxt += max(t, h, w)
            else:
                for r in rows:
                    r.append(nxt)
                nxt += 1
                i += 1
        pos[:, b, mask[b].bool()] = torch.tensor(rows)
    return pos
