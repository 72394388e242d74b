"""The Qwen2 decoder of SliMM: M-RoPE, grouped-query attention, a preallocated KV cache, DeepStack.

Written to export cleanly: no Python branching on tensor values, positions and masks come in as
tensors, and the cache is written in place at an integer offset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimm.config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def mrope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE angles: position_ids (3, B, S) -> cos, sin (B, S, head_dim).

    Frequency slot f takes its angle from position row i when f falls in section i; the angles are
    repeated twice across the head dimension (rotate-half convention).
    """
    freqs = position_ids[..., None].float() * inv_freq.float()  # (3, B, S, hd/2)
    parts, start = [], 0
    for i, n in enumerate(mrope_section):
        parts.append(freqs[i, ..., start : start + n])
        start += n
    angles = torch.cat(parts, dim=-1)  # (B, S, hd/2)
    emb = torch.cat([angles, angles], dim=-1)  # (B, S, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, H, S, D), cos/sin (B, S, D)
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def attention_bias(
    attention_mask: torch.Tensor, past_len: int, q_len: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive bias (B, 1, q_len, past_len + q_len): causal within the sequence plus key padding.

    attention_mask (B, past_len + q_len) holds 1 for real tokens. Masked scores get the dtype's most
    negative value rather than -inf so that a fully padded query row stays finite.
    """
    kv_len = attention_mask.shape[1]
    q_pos = torch.arange(past_len, past_len + q_len, device=attention_mask.device)[:, None]
    k_pos = torch.arange(kv_len, device=attention_mask.device)[None, :]
    allowed = (k_pos <= q_pos)[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, q, kv)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, neg)


class KVCache:
    """Preallocated key/value buffers, one pair per layer: (B, kv_heads, capacity, head_dim)."""

    def __init__(self, cfg: TextConfig, batch: int, capacity: int, dtype: torch.dtype, device) -> None:
        shape = (batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.capacity = capacity
        self.length = 0  # positions filled so far

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, kv_heads, S, D) at the current offset; return the filled part of the buffers."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, bias, cache: KVCache | None) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, S, D)
        k = self.k_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, S, D)
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, KV, past + S, D)
        rep = self.n_heads // self.n_kv
        k = k.repeat_interleave(rep, dim=1)  # (B, H, T, D)
        v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, S, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"LLM hidden_act {cfg.hidden_act!r} is not supported (Qwen2 uses silu)")
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, bias, cache):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, bias, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LanguageModel(nn.Module):
    """Embedding, decoder layers and final norm; checkpoint prefix `model.`."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.init_buffers()

    def init_buffers(self, device=None) -> None:
        """Rotary frequencies (not in checkpoints); called again after loading onto a meta model."""
        hd = self.cfg.head_dim
        inv_freq = 1.0 / (
            self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd)
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return mrope_cos_sin(position_ids, self.inv_freq, self.cfg.mrope_section, dtype)

    def forward(
        self,
        h: torch.Tensor,  # (B, S, d) input embeddings
        cos: torch.Tensor,  # (B, S, head_dim)
        sin: torch.Tensor,
        bias: torch.Tensor,  # (B, 1, S, past + S)
        cache: KVCache | None = None,
        deepstack: torch.Tensor | None = None,  # (K, L, d) slices, added before layers start..
        visual_pos: torch.Tensor | None = None,  # (L,) flat indices into B*S of the visual tokens
        deepstack_start: int = 1,
        deepstack_interval: int = 1,
    ) -> torch.Tensor:
        B, S, d = h.shape
        n_slices = 0 if deepstack is None else deepstack.shape[0]
        for j, layer in enumerate(self.layers):
            k = (j - deepstack_start) // deepstack_interval
            if n_slices and j >= deepstack_start and k < n_slices:
                h = h.reshape(B * S, d).index_add(0, visual_pos, deepstack[k].to(h.dtype)).view(B, S, d)
            h = layer(h, cos, sin, bias, cache)
        if cache is not None:
            cache.length += S
        return self.norm(h)
