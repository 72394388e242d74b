"""The peer: transformers' own Qwen2VLForConditionalGeneration on the same released-format checkpoint.

Plain SliMM is Qwen2-VL's architecture, so transformers runs it as it is (its loader maps the released
`model.*` / `visual.*` names itself); DeepStack variants add layers transformers does not have.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def qwen2vl_config(ckpt_dir: str | Path):
    """transformers' Qwen2VLConfig for a SliMM checkpoint, from slimm's own reading of config.json
    (a plain Qwen2-0.5B-based checkpoint says model_type "qwen2" and derives its M-RoPE sections)."""
    from transformers import Qwen2VLConfig

    from slimm.config import load_config

    c = load_config(ckpt_dir)
    if c.use_deepstack:
        raise ValueError(f"{ckpt_dir}: DeepStack ({c.deepstack_type}) has no transformers counterpart")
    t, v = c.text, c.vision
    text = dict(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings,
        rope_parameters={
            "rope_type": "default",
            "mrope_section": list(t.mrope_section),
            "rope_theta": t.rope_theta,
        },
        hidden_act="silu",
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=c.pad_token_id,
    )
    vision = dict(
        depth=v.depth,
        embed_dim=v.embed_dim,
        hidden_size=t.hidden_size,
        mlp_ratio=v.mlp_ratio,
        num_heads=v.num_heads,
        in_channels=v.in_channels,
        patch_size=v.patch_size,
        spatial_merge_size=v.spatial_merge_size,
        temporal_patch_size=v.temporal_patch_size,
        hidden_act="quick_gelu",
    )
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=t.tie_word_embeddings,
        image_token_id=c.image_token_id,
        video_token_id=c.video_token_id,
        vision_start_token_id=c.vision_start_token_id,
        vision_end_token_id=c.vision_end_token_id,
    )


class TransformersRunner:
    """prefill / decode / encode over transformers' model, shaped like slimm's backends; greedy
    decode calls the model's forward directly (no `generate` bookkeeping is timed, which can only
    favour the peer)."""

    name = "transformers"

    def __init__(self, ckpt_dir: str | Path, dtype: str = "float32") -> None:
        import torch
        from transformers import Qwen2VLForConditionalGeneration
        from transformers.utils import logging

        logging.set_verbosity_error()  # its loading bar and generation-flag notes would mix into ours
        logging.disable_progress_bar()
        self.torch = torch
        model, info = Qwen2VLForConditionalGeneration.from_pretrained(
            ckpt_dir, config=qwen2vl_config(ckpt_dir), dtype=getattr(torch, dtype), output_loading_info=True
        )
        bad = {
            k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")
        }
        if bad:
            raise ValueError(f"transformers loaded {ckpt_dir} with {bad}")
        self.model = model.eval()
        self.image_token_id = model.config.image_token_id
        self.cache = None

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def encode(self, pixels: np.ndarray, grid: np.ndarray) -> None:
        torch = self.torch
        with torch.inference_mode():
            self.model.model.get_image_features(torch.from_numpy(pixels), torch.from_numpy(grid))

    def prefill(self, inputs: dict[str, np.ndarray], capacity: int) -> np.ndarray:
        torch = self.torch
        from transformers import DynamicCache

        t = {k: torch.from_numpy(v) for k, v in inputs.items()}
        t["mm_token_type_ids"] = (t["input_ids"] == self.image_token_id).long()  # what its processor adds
        self.model.model.rope_deltas = None
        self.cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            out = self.model(**t, cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float().numpy()

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        torch = self.torch
        # no attention mask (batch 1, no padding): positions follow from the cache length and
        # the M-RoPE offset the prefill stored (`rope_deltas`), as in transformers' own generate
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.from_numpy(tokens)[:, None],
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1].float().numpy()
