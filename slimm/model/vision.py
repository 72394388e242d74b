"""The Qwen2-VL vision transformer (checkpoint prefix `visual.`), without its merger.

Grid bookkeeping (2-D rotary positions, which frame a patch belongs to) is computed on the host
from `grid_thw` (slimm/host/vision_index.py) and enters the tower as tensors, so the tower itself has
no data-dependent Python control flow and exports with dynamic shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimm.config import VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel_size=k, stride=k, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the kernel is the stride and each row one whole patch: the convolution is one GEMM, rows
        # (N, C*T*P*P) by the flattened kernel (embed, C*T*P*P), which is how it runs and exports
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.flatten(1))  # (N, C*T*P*P) -> (N, embed)


def vision_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (N, H, D) in float32, cos/sin (N, D)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=True)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=True)
        self.fused = False  # VisionTower.fuse_attention

    def forward(self, x, cos, sin, mask: torch.Tensor | None, chunks: list[int] | None) -> torch.Tensor:
        N, _ = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.n_heads, self.head_dim).unbind(1)  # each (N, H, D)
        dtype = q.dtype
        q = vision_rope(q.float(), cos, sin).to(dtype)
        k = vision_rope(k.float(), cos, sin).to(dtype)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (H, N, D)
        if chunks is not None:
            # eager: attention per frame, no N x N mask; 4-D (1, H, n, D), which torch's fused CPU
            # kernel takes (3-D inputs fall back to its unfused path: 2.5x slower at 1024 patches)
            outs = [
                F.scaled_dot_product_attention(qc[None], kc[None], vc[None])[0]
                for qc, kc, vc in zip(q.split(chunks, 1), k.split(chunks, 1), v.split(chunks, 1), strict=True)
            ]
            out = torch.cat(outs, dim=1)
        elif self.fused:  # the same mask, one operator (VisionTower.fuse_attention)
            out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]
        else:  # block-diagonal mask (N, N), written out so that it exports as plain ONNX ops
            scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5  # (H, N, N)
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            out = torch.softmax(scores.float(), dim=-1).to(dtype) @ v
        return self.proj(out.transpose(0, 1).reshape(N, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision hidden_act {cfg.hidden_act!r} is not supported: {sorted(ACTIVATIONS)}")
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.embed_dim)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, mask, chunks):
        x = x + self.attn(self.norm1(x), cos, sin, mask, chunks)
        return x + self.mlp(self.norm2(x))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.init_buffers()

    def init_buffers(self, device=None) -> None:
        """Rotary frequencies (not in checkpoints); called again after loading onto a meta model."""
        quarter = self.cfg.head_dim // 2  # frequencies for one axis: head_dim/4 of them
        ar = torch.arange(0, quarter, 2, dtype=torch.float32, device=device)
        self.register_buffer("inv_freq", 1.0 / (10000.0 ** (ar / quarter)), persistent=False)

    def fuse_attention(self) -> None:
        """Write each block's masked attention as one scaled_dot_product_attention, which the ONNX
        exporter turns into ONNX's Attention operator at opset 23 (ATTENTION_OPSET): one fused kernel
        in ONNX Runtime instead of the two products, the scale, the mask's Where and the softmax over
        heads x patches x patches scores (`slimm export --fused`, an ONNX Runtime-only part B)."""
        for blk in self.blocks:
            blk.attn.fused = True

    def rope(self, rotary_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rotary_ids (N, 2) -> cos, sin (N, head_dim): row angles, then column angles, twice."""
        angles = (rotary_ids[..., None].float() * self.inv_freq).flatten(1)  # (N, head_dim/2)
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos(), emb.sin()

    def forward(
        self,
        pixels: torch.Tensor,  # (N, C*T*P*P)
        rotary_ids: torch.Tensor,  # (N, 2)
        frame_ids: torch.Tensor,  # (N,)
        chunks: list[int] | None = None,  # patches per frame; eager only
        record: tuple[int, ...] = (),  # blocks whose INPUT hidden states are returned too
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embed(pixels)  # (N, embed)
        cos, sin = self.rope(rotary_ids)
        mask = None if chunks is not None else frame_ids[:, None] == frame_ids[None, :]  # (N, N)
        recorded = []
        for i, blk in enumerate(self.blocks):
            if i in record:
                recorded.append(x)
            x = blk(x, cos, sin, mask, chunks)
        return x, recorded
