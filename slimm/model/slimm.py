"""SliMM in PyTorch: vision tower + merger -> fused embeddings -> Qwen2 decoder with M-RoPE and DeepStack.

`SliMMForConditionalGeneration` keeps the original repository's public API (`from_pretrained`,
`model(**inputs).logits`, `generate(...)`), on the project's own modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimm.config import MIDLAYER_FEATURE_INDICES, SliMMConfig, load_config
from slimm.errors import InputError
from slimm.host.positions import model_rope_index
from slimm.host.vision_index import vision_chunks, vision_host_inputs
from slimm.hub import resolve_model
from slimm.model.language import KVCache, LanguageModel
from slimm.model.merger import build_merger, efficient_split_patches
from slimm.model.vision import VisionTower
from slimm.model.weights import load_weights

# transformers-style keywords callers pass along that this model does not need
HF_ACCEPTED_KWARGS = {
    "mm_token_type_ids",
    "use_cache",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "cache_position",
    "rope_deltas",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Visual(VisionTower):
    """Vision tower and merger under the checkpoint prefix `visual.` (patch_embed, blocks, merger)."""

    def __init__(self, cfg: SliMMConfig) -> None:
        super().__init__(cfg.vision)
        self.slimm_cfg = cfg
        self.merger = build_merger(cfg)

    def host_inputs(self, grid_thw) -> dict[str, np.ndarray]:
        """Index tensors the tower needs, computed from the grid on the host (NumPy)."""
        return vision_host_inputs(self.slimm_cfg.deepstack_type, self.slimm_cfg.spatial_merge_size, grid_thw)

    def run(
        self,
        pixel_values: torch.Tensor,  # (R, C*T*P'*P') processor patch rows
        rotary_ids: torch.Tensor,  # (N, 2)
        frame_ids: torch.Tensor,  # (N,)
        pixel_index: torch.Tensor | None = None,  # efficient: (R,) rows back to raster order
        coarse_index: torch.Tensor | None = None,  # efficient: (N/4,) windows grouped 2x2
        chunks: list[int] | None = None,  # patches per frame (eager); None = block-diagonal mask
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tensor part of the vision encoder (what SliMM_B exports)."""
        cfg, v = self.slimm_cfg, self.cfg
        extra = {}
        if pixel_index is not None:
            rows = pixel_values[pixel_index]
            pixel_values = efficient_split_patches(rows, v.in_channels, v.temporal_patch_size, v.patch_size)
            extra["coarse_index"] = coarse_index
        record = MIDLAYER_FEATURE_INDICES if cfg.deepstack_type == "midlayers" else ()
        x, recorded = self(
            pixel_values.to(self.patch_embed.proj.weight.dtype), rotary_ids, frame_ids, chunks, record
        )
        return self.merger(x, recorded, **extra)

    def encode(self, pixel_values: torch.Tensor, grid_thw) -> tuple[torch.Tensor, torch.Tensor | None]:
        """pixel_values (R, C*T*P'*P'), grid_thw (n, 3) -> main tokens (L, d), slices (K, L, d) or None."""
        cfg, v = self.slimm_cfg, self.cfg
        grid = np.asarray(grid_thw.cpu() if torch.is_tensor(grid_thw) else grid_thw, dtype=np.int64).reshape(
            -1, 3
        )
        expected = int(grid.prod(1).sum())
        if pixel_values.ndim != 2 or pixel_values.shape[0] != expected:
            raise InputError(
                f"pixel_values has shape {tuple(pixel_values.shape)} but grid_thw {grid.tolist()} "
                f"describes {expected} patch rows"
            )
        scale = 2 if cfg.deepstack_type == "efficient" else 1
        row_width = v.in_channels * v.temporal_patch_size * (scale * v.patch_size) ** 2
        if pixel_values.shape[1] != row_width:
            raise InputError(
                f"pixel_values rows have {pixel_values.shape[1]} values; this model expects {row_width} "
                f"(C={v.in_channels} x T={v.temporal_patch_size} x {scale * v.patch_size}x{scale * v.patch_size} patches)"
            )
        if cfg.deepstack_type == "efficient" and (grid[:, 1:] % 2).any():
            raise InputError(f"efficient needs even grid heights and widths, got grid_thw {grid.tolist()}")
        dev = pixel_values.device
        idx = {k: torch.from_numpy(a).to(dev) for k, a in self.host_inputs(grid).items()}
        return self.run(
            pixel_values, **idx, chunks=vision_chunks(grid * (np.array([1, 2, 2]) if scale == 2 else 1))
        )


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, S, V) float32
    rope_deltas: torch.Tensor | None = None

    def __getitem__(self, i):
        return (self.logits, self.rope_deltas)[i]


class SliMMForConditionalGeneration(nn.Module):
    """The whole model. Checkpoint names: `model.*` (LLM), `visual.*`, `lm_head` (absent when tied)."""

    def __init__(self, cfg: SliMMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.visual = Visual(cfg)
        self.model = LanguageModel(cfg.text)
        self.lm_head = None
        if not cfg.text.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        torch_dtype: str | torch.dtype = "auto",
        device_map: str | None = "cpu",
        **kwargs,
    ) -> SliMMForConditionalGeneration:
        path = resolve_model(path)  # a directory or a hub id, like the original's from_pretrained
        cfg = load_config(path)
        if torch_dtype == "auto":
            dtype = DTYPES.get(cfg.torch_dtype, torch.float32)
        elif isinstance(torch_dtype, str):
            if torch_dtype not in DTYPES:
                raise InputError(f"torch_dtype {torch_dtype!r} is not one of auto, {', '.join(DTYPES)}")
            dtype = DTYPES[torch_dtype]
        else:
            dtype = torch_dtype
        with torch.device("meta"):
            model = cls(cfg)
        load_weights(model, path, dtype)
        device = device_map if isinstance(device_map, str) and device_map != "auto" else "cpu"
        return model.to(device).eval()

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    # ---- the forward pass, in the order the data flows ------------------------------------------
    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        encode_visual=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Token embeddings with visual tokens written in; returns (embeds, slices, visual_pos).
        `encode_visual` replaces `self.visual.encode` (the server's visual cache goes in here)."""
        cfg = self.config
        h = self.model.embed_tokens(input_ids)  # (B, S, d)
        B, S, d = h.shape
        flat = h.reshape(B * S, d)
        pos_all, slices_all = [], []
        for pixels, grid, token, what in (
            (pixel_values, image_grid_thw, cfg.image_token_id, "image"),
            (pixel_values_videos, video_grid_thw, cfg.video_token_id, "video"),
        ):
            if pixels is None:
                continue
            if grid is None:
                raise InputError(f"{what} pixel values were given without {what}_grid_thw")
            encode = encode_visual or self.visual.encode
            tokens, slices = encode(torch.as_tensor(pixels).to(self.device), grid)
            pos = (input_ids.reshape(-1) == token).nonzero().squeeze(1)  # (L,)
            if pos.numel() != tokens.shape[0]:
                raise InputError(
                    f"the prompt holds {pos.numel()} {what} tokens but the {what}s give {tokens.shape[0]} "
                    f"(grid_thw {np.asarray(grid).tolist()}); expand each <|{what}_pad|> to match"
                )
            flat = flat.index_copy(0, pos, tokens.to(flat.dtype))
            pos_all.append(pos)
            if slices is not None:
                slices_all.append(slices)
        h = flat.view(B, S, d)
        if not slices_all:
            return h, None, None
        # several visual inputs: slices in prompt order (the original concatenated them wrongly)
        pos = torch.cat(pos_all)
        order = torch.argsort(pos)
        return h, torch.cat(slices_all, dim=1)[:, order], pos[order]

    def rope_index(self, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None):
        pos, deltas = model_rope_index(self.config, input_ids, image_grid_thw, video_grid_thw, attention_mask)
        return torch.from_numpy(pos).to(self.device), torch.from_numpy(deltas).to(self.device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.output_weight().T).float()

    def empty_cache(self, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        t = self.config.text
        shape = (batch, t.num_key_value_heads, 0, t.head_dim)
        empty = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(t.num_hidden_layers)]
        return empty, list(empty), torch.zeros((batch, 0), dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: KVCache | None,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        last_only: bool = True,
        encode_visual=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompt (filling `cache` if given); returns (logits (B, V) of the last position
        or (B, S, V), rope_deltas (B, 1))."""
        cfg = self.config
        h, slices, visual_pos = self.embed(
            input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, encode_visual
        )
        position_ids, deltas = self.rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask)
        cos, sin = self.model.rope(position_ids, h.dtype)
        past = (cache.keys, cache.values, cache.mask) if cache is not None else self.empty_cache(h.shape[0])
        hidden, new_k, new_v = self.model(
            h,
            cos,
            sin,
            *past,
            attention_mask,
            slices,
            visual_pos,
            cfg.local_features_start,
            cfg.local_features_interval,
        )
        if cache is not None:
            cache.append(new_k, new_v, attention_mask)
        return self.logits(hidden[:, -1] if last_only else hidden), deltas

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, rope_deltas: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per sequence: tokens (B,) -> logits (B, V); the cache grows by one position."""
        h = self.model.embed_tokens(tokens[:, None])  # (B, 1, d)
        position_ids = (rope_deltas + cache.length).view(1, -1, 1).expand(3, -1, 1)  # (3, B, 1)
        cos, sin = self.model.rope(position_ids, h.dtype)
        cur_mask = torch.ones_like(tokens[:, None])
        hidden, new_k, new_v = self.model(h, cos, sin, cache.keys, cache.values, cache.mask, cur_mask)
        cache.append(new_k, new_v, cur_mask)
        return self.logits(hidden[:, -1])

    # ---- the original's API ---------------------------------------------------------------------
    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        **extra,
    ) -> CausalLMOutput:
        unknown = set(extra) - HF_ACCEPTED_KWARGS
        if unknown:
            raise InputError(f"unknown model inputs: {', '.join(sorted(unknown))}")
        input_ids = torch.as_tensor(input_ids).to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = torch.as_tensor(attention_mask).to(self.device)
        logits, deltas = self.prefill(
            input_ids,
            attention_mask,
            None,
            pixel_values,
            image_grid_thw,
            pixel_values_videos,
            video_grid_thw,
            last_only=False,
        )
        return CausalLMOutput(logits=logits, rope_deltas=deltas)

    def generate(self, input_ids=None, **kwargs):
        """transformers-style generate on the shared loop (see slimm.generate)."""
        from slimm.model.runner import ModelRunner

        return ModelRunner(self).generate(input_ids=input_ids, **kwargs)
