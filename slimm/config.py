"""Model and processing settings read from a SliMM checkpoint directory.

Dataclasses built from config.json / generation_config.json / preprocessor_config.json;
unknown keys are ignored, missing keys take the released SliMM / Qwen2-VL defaults.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimm.errors import CheckpointError, InputError

# Qwen2 tokenizer ids; a checkpoint's config files override them.
QWEN2_SPECIAL_TOKENS = {
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
}
DEEPSTACK_TYPES = ("v1", "midlayers", "efficient")
VARIANTS = ("plain", *DEEPSTACK_TYPES)  # the model variants: no DeepStack, or one of its three kinds
MIDLAYER_FEATURE_INDICES = (8, 16, 24, 30)  # vision blocks whose INPUT midlayers stacks (hard-coded upstream)
DEFAULT_MAX_SEQ_LEN = 4096


def read_json(path: Path, required: bool = True) -> dict[str, Any]:
    """Read one JSON file, naming it in any error."""
    if not path.exists():
        if required:
            raise CheckpointError(f"{path}: file not found")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _pick(cls, d: dict[str, Any], **overrides):
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names and v is not None}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**kw)


@dataclass
class VisionConfig:
    depth: int = 32  # ViT blocks (DFN-Huge)
    embed_dim: int = 1280  # width of the vision tower
    num_heads: int = 16
    mlp_ratio: float = 4.0  # fc1 width = embed_dim * mlp_ratio
    hidden_act: str = "quick_gelu"  # x * sigmoid(1.702 x) in Qwen2-VL towers
    in_channels: int = 3
    patch_size: int = 14  # pixels per side of one tower patch
    spatial_merge_size: int = 2  # 2x2 vision patches -> one LLM token
    temporal_patch_size: int = 2  # frames per patch (an image is repeated to 2 frames)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


@dataclass
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2  # grouped-query attention
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])  # freq slots per (t, h, w) row
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class SliMMConfig:
    model_type: str
    text: TextConfig
    vision: VisionConfig
    use_deepstack: bool = False
    deepstack_type: str | None = None  # v1 | midlayers | efficient, only when use_deepstack
    local_features_start: int = 1  # first LLM layer that receives a DeepStack slice
    local_features_interval: int = 1  # layers between two slices
    use_mrope: bool = True
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision_token_id: int = 151654
    image_token_id: int = 151655
    video_token_id: int = 151656
    eos_token_id: list[int] = field(default_factory=lambda: [151645, 151643])
    pad_token_id: int = 151643
    torch_dtype: str = "float32"

    @property
    def num_deepstack(self) -> int:
        return 4 if self.use_deepstack else 0  # K slices: m^2 = 4 for v1/efficient, 4 midlayers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SliMMConfig:
        """Inverse of to_dict (the model settings an export manifest carries)."""
        d = dict(d)
        text, vision = _pick(TextConfig, d.pop("text")), _pick(VisionConfig, d.pop("vision"))
        return _pick(cls, d, text=text, vision=vision)


def _mrope_section(cfg: dict[str, Any], model_type: str, head_dim: int) -> list[int]:
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if model_type == "qwen2_vl" and rope.get("mrope_section"):
        section = list(rope["mrope_section"])
    else:
        # the original derives it for plain qwen2 LLMs
        section = [16, 24, 24]
        if sum(section) * 2 > head_dim:
            section = [8, 12, 12]
    if 2 * sum(section) != head_dim:
        raise CheckpointError(
            f"mrope_section {section} does not fit head_dim {head_dim}: 2*sum(section) must equal head_dim"
        )
    return section


def _rope_theta(cfg: dict[str, Any]) -> float:
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    rope = cfg.get("rope_parameters") or {}
    return float(rope.get("rope_theta", 1000000.0))


def resolve_custom_visual_model(ckpt_dir: Path, name: str) -> Path:
    """A `custom_visual_model` is looked up under the checkpoint first, then as given, then (an
    `owner/name` hub id) in the Hugging Face cache, downloaded when online."""
    from slimm.hub import download_command, looks_like_hub_id, resolve_hub_id

    for cand in (ckpt_dir / name, Path(name).expanduser()):
        if cand.is_dir():
            return cand
    where = (
        f"custom_visual_model {name!r} (from {ckpt_dir / 'config.json'}) is not a directory under {ckpt_dir}"
    )
    if not looks_like_hub_id(name):
        raise CheckpointError(f"{where} nor as given")
    try:
        return resolve_hub_id(name)
    except CheckpointError as e:
        # the hub error ends with its own fetch command; offer the checkpoint-local copy too
        raise CheckpointError(
            f"{where}, and {str(e).split(': ', 1)[1]} (or `{download_command(name, ckpt_dir / name)}`)"
        ) from None


def _has_lm_head(ckpt_dir: Path) -> bool:
    index = ckpt_dir / "model.safetensors.index.json"
    if index.exists():
        return "lm_head.weight" in read_json(index).get("weight_map", {})
    single = ckpt_dir / "model.safetensors"
    if not single.exists():
        return False
    from safetensors import safe_open

    try:
        with safe_open(single, framework="np") as f:
            return "lm_head.weight" in f.keys()
    except Exception:  # noqa: BLE001 - a corrupt file is reported by the weight loader, by name
        return False


def load_config(ckpt_dir: str | Path) -> SliMMConfig:
    """Build the model settings from a checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: checkpoint directory not found")
    cfg = read_json(ckpt_dir / "config.json")
    gen = read_json(ckpt_dir / "generation_config.json", required=False)
    model_type = cfg.get("model_type")
    if model_type not in ("qwen2", "qwen2_vl"):
        raise CheckpointError(
            f"{ckpt_dir / 'config.json'}: model_type {model_type!r} is not supported (expected qwen2 or qwen2_vl)"
        )
    # transformers >= 5 nests the LLM settings in text_config
    text_src = {**cfg, **(cfg.get("text_config") or {})}

    def slimm_field(name: str, default: Any) -> Any:
        # config.json is what the original model reads; generation_config.json carries the same fields
        if name in cfg:
            if gen.get(name) is not None and gen[name] != cfg[name]:
                warnings.warn(
                    f"{name}: config.json says {cfg[name]!r}, generation_config.json {gen[name]!r}; using config.json",
                    stacklevel=3,
                )
            return cfg[name]
        return gen.get(name, default)

    heads = int(text_src.get("num_attention_heads", 14))
    hidden = int(text_src.get("hidden_size", 896))
    head_dim = hidden // heads
    text = _pick(
        TextConfig,
        text_src,
        rope_theta=_rope_theta(text_src),
        mrope_section=_mrope_section(text_src, model_type, head_dim),
        num_key_value_heads=text_src.get("num_key_value_heads") or heads,
    )
    if "tie_word_embeddings" in cfg:
        text.tie_word_embeddings = bool(cfg["tie_word_embeddings"])
    elif "tie_word_embeddings" not in text_src:
        # not stated: transformers' Qwen2 classes would default to untied and use the checkpoint's
        # lm_head; follow the weights, so a missing lm_head never means a random output layer
        text.tie_word_embeddings = not _has_lm_head(ckpt_dir)

    # vision tower: `custom_visual_model` directory, else `vision_config`
    custom = slimm_field("custom_visual_model", None)
    if custom:
        vdir = resolve_custom_visual_model(ckpt_dir, custom)
        vcfg = read_json(vdir / "config.json")
        vcfg = vcfg.get("vision_config", vcfg)
    else:
        vcfg = cfg.get("vision_config")
        if vcfg is None:
            raise CheckpointError(
                f"{ckpt_dir / 'config.json'}: no vision_config and no custom_visual_model: "
                "cannot tell the vision tower's shape"
            )
    merge = int(slimm_field("spatial_merge_size", vcfg.get("spatial_merge_size", 2)))
    tpatch = int(slimm_field("temporal_patch_size", vcfg.get("temporal_patch_size", 2)))
    vision = _pick(VisionConfig, vcfg, spatial_merge_size=merge, temporal_patch_size=tpatch)
    if vision.embed_dim % vision.num_heads:
        raise CheckpointError(
            f"vision embed_dim {vision.embed_dim} is not divisible by num_heads {vision.num_heads}"
        )

    use_deepstack = bool(slimm_field("use_deepstack", False))
    deepstack_type = slimm_field("deepstack_type", "v1") if use_deepstack else None
    if use_deepstack and deepstack_type not in DEEPSTACK_TYPES:
        raise CheckpointError(
            f"{ckpt_dir / 'config.json'}: unknown deepstack_type {deepstack_type!r}; "
            f"supported: {', '.join(DEEPSTACK_TYPES)}"
        )
    if deepstack_type == "midlayers" and vision.depth <= max(MIDLAYER_FEATURE_INDICES):
        raise CheckpointError(
            f"deepstack_type 'midlayers' reads vision blocks {list(MIDLAYER_FEATURE_INDICES)}, "
            f"but the tower has depth {vision.depth}"
        )

    tokens = {}
    for name, default in QWEN2_SPECIAL_TOKENS.items():
        tokens[name] = int(cfg.get(name, text_src.get(name, default)))
    eos = gen.get("eos_token_id", cfg.get("eos_token_id", [151645, 151643]))
    eos = [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
    if pad is None:
        pad = 151643 if 151643 < text.vocab_size else eos[-1]

    return SliMMConfig(
        model_type=model_type,
        text=text,
        vision=vision,
        use_deepstack=use_deepstack,
        deepstack_type=deepstack_type,
        local_features_start=int(slimm_field("local_features_start", 1)),
        local_features_interval=int(slimm_field("local_features_interval", 1)),
        use_mrope=bool(slimm_field("use_mrope", True)),
        spatial_merge_size=merge,
        temporal_patch_size=tpatch,
        eos_token_id=eos,
        pad_token_id=int(pad),
        torch_dtype=str(
            cfg.get("torch_dtype") or text_src.get("torch_dtype") or cfg.get("dtype") or "float32"
        ),
        **tokens,
    )


def check_pixel_bounds(min_pixels: int | None = None, max_pixels: int | None = None) -> None:
    """Image area bounds a user passes (CLI and Processor.from_pretrained alike); None = the
    checkpoint's own."""
    for name, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InputError(f"{name} must be a positive number of pixels, got {v!r}")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise InputError(f"min_pixels {min_pixels} is more than max_pixels {max_pixels}")


@dataclass
class PreprocessorConfig:
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14  # 28 for DeepStack-Efficient: its patches are cut again into 2x2 tower patches
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessorConfig:
        size = d.get("size") or {}
        return _pick(
            cls,
            d,
            min_pixels=d.get("min_pixels", size.get("shortest_edge")),
            max_pixels=d.get("max_pixels", size.get("longest_edge")),
        )

    @classmethod
    def from_dir(cls, ckpt_dir: str | Path) -> PreprocessorConfig:
        return cls.from_dict(read_json(Path(ckpt_dir) / "preprocessor_config.json", required=False))
