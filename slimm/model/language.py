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
        # x / sqrt(.) rather than x * rsqrt(.): the same to an ulp, and the form ONNX Runtime fuses
        # into one SimplifiedLayerNormalization kernel (the rsqrt form stays seven kernels)
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
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
    # x (B, H, S, D), cos/sin (B, 1, S, D): broadcast over the heads
    return x * cos + rotate_half(x) * sin


def attention_bias(past_mask: torch.Tensor, cur_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive bias (B, 1, S, T + S) over [cached keys | current keys].

    past_mask (B, T) marks cache slots holding a real token; cur_mask (B, S) the current tokens
    (0 = left padding), which also see each other causally. Masked scores get the dtype's most
    negative value rather than -inf so that a fully padded query row stays finite.
    """
    S = cur_mask.shape[1]
    idx = torch.arange(S, device=cur_mask.device)
    causal = idx[None, :] <= idx[:, None]  # (S, S): key <= query
    allowed_cur = causal[None] & cur_mask[:, None, :].bool()  # (B, S, S)
    allowed_past = past_mask[:, None, :].bool() & torch.ones_like(causal[:, :1])[None]  # (B, S, T)
    allowed = torch.cat([allowed_past, allowed_cur], dim=-1)[:, None]  # (B, 1, S, T + S)
    zero = torch.zeros((), dtype=dtype, device=cur_mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=cur_mask.device)
    return torch.where(allowed, zero, neg)


class KVCache:
    """Preallocated key/value buffers, one pair per layer: (B, kv_heads, capacity, head_dim).

    The decoder reads the whole buffers (fixed shapes at every step) and returns only the new
    entries, which `append` writes in place: a step never copies the cache.
    """

    def __init__(self, cfg: TextConfig, batch: int, capacity: int, dtype: torch.dtype, device) -> None:
        shape = (batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.mask = torch.zeros((batch, capacity), dtype=torch.int64, device=device)  # 1 = real token
        self.capacity = capacity
        self.length = 0  # positions filled so far

    def append(self, keys: list[torch.Tensor], values: list[torch.Tensor], cur_mask: torch.Tensor) -> None:
        end = self.length + cur_mask.shape[1]
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.capacity}")
        for buf, new in zip(self.keys + self.values, keys + values, strict=True):
            buf[:, :, self.length : end] = new
        self.mask[:, self.length : end] = cur_mask
        self.length = end


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.qkv_proj: nn.Linear | None = None  # set by fuse()

    @torch.no_grad()
    def fuse(self) -> None:
        """q, k and v projections as one matmul, the query rows pre-scaled by 1/sqrt(head_dim)
        (rotation is linear, so scaling before it is the same): fewer, larger kernels in exported
        graphs. Replaces q_proj / k_proj / v_proj, so a fused model no longer has checkpoint names."""
        scale = self.head_dim**-0.5
        q, k, v = self.q_proj, self.k_proj, self.v_proj
        fused = nn.Linear(
            q.in_features,
            q.out_features + k.out_features + v.out_features,
            bias=True,
            device=q.weight.device,
            dtype=q.weight.dtype,
        )
        fused.weight.copy_(torch.cat([q.weight * scale, k.weight, v.weight]))
        fused.bias.copy_(torch.cat([q.bias * scale, k.bias, v.bias]))
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj = fused

    def project(self, x, cos, sin):
        """x (B, S, d) -> rotated, scaled queries (B, H, S, D); rotated keys and values (B, KV, S, D)."""
        B, S, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(B, S, H + 2 * KV, D).transpose(1, 2)  # (B, H + 2KV, S, D)
            qk = apply_rope(qkv[:, : H + KV], cos, sin)  # queries and keys in one rotation
            return qk[:, :H], qk[:, H:], qkv[:, H + KV :]
        q = self.q_proj(x).view(B, S, H, D).transpose(1, 2)  # (B, H, S, D)
        k = self.k_proj(x).view(B, S, KV, D).transpose(1, 2)  # (B, KV, S, D)
        v = self.v_proj(x).view(B, S, KV, D).transpose(1, 2)
        return apply_rope(q, cos, sin) * D**-0.5, apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, bias, k_past, v_past):
        """x (B, S, d); cos/sin (B, 1, S, D); bias (B, 1, 1, S, T + S); k_past/v_past (B, KV, T, D)
        cache buffers -> (out, new k, new v)."""
        B, S, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        rep = H // KV
        q, k, v = self.project(x, cos, sin)
        # grouped-query attention without repeating K/V: the `rep` query heads of each KV head
        # are folded into the query axis, so cached keys are read in place
        qg = q.reshape(B, KV, rep * S, D)
        T = k_past.shape[2]
        scores = torch.cat(
            [qg @ k_past.transpose(-1, -2), qg @ k.transpose(-1, -2)], dim=-1
        )  # (B, KV, rep*S, T+S)
        scores = scores.view(B, KV, rep, S, T + S) + bias
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype).view(B, KV, rep * S, T + S)
        out = probs[..., :T] @ v_past + probs[..., T:] @ v  # (B, KV, rep*S, D)
        out = out.view(B, H, S, D).transpose(1, 2).reshape(B, S, H * D)
        return self.o_proj(out), k, v


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
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, bias, k_past, v_past):
        a, k, v = self.self_attn(self.input_layernorm(h), cos, sin, bias, k_past, v_past)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


class LanguageModel(nn.Module):
    """Embedding, decoder layers and final norm; checkpoint prefix `model.`."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.init_buffers()

    def init_buffers(self, device=None) -> None:
        """Rotary frequencies (not in checkpoints); called again after loading onto a meta model."""
        hd = self.cfg.head_dim
        inv_freq = 1.0 / (
            self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd)
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def fuse(self) -> None:
        """Fused q/k/v projections in every layer (see Attention.fuse): used for export. Gate and up
        stay two matmuls: fused, the split of their output cost ONNX Runtime 5-10% of a 256-token
        prefill and saved nothing in decode."""
        for layer in self.layers:
            layer.self_attn.fuse()

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return mrope_cos_sin(position_ids, self.inv_freq, self.cfg.mrope_section, dtype)

    def forward(
        self,
        h: torch.Tensor,  # (B, S, d) input embeddings
        cos: torch.Tensor,  # (B, S, head_dim)
        sin: torch.Tensor,
        past_keys: list[torch.Tensor],  # per layer (B, KV, T, D); T may be 0
        past_values: list[torch.Tensor],
        past_mask: torch.Tensor,  # (B, T) 1 = cache slot holds a real token
        cur_mask: torch.Tensor,  # (B, S) 1 = real token, 0 = left padding
        deepstack: torch.Tensor | None = None,  # (K, L, d) slices, added before layers start..
        visual_pos: torch.Tensor | None = None,  # (L,) flat indices into B*S of the visual tokens
        deepstack_start: int = 1,
        deepstack_interval: int = 1,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """-> final-norm hidden states (B, S, d) and the new keys/values of every layer."""
        B, S, d = h.shape
        # computed once for every layer: the mask over the rep query heads of each KV head, and
        # the rotation broadcast over the heads
        bias = attention_bias(past_mask, cur_mask, h.dtype)[:, :, None]  # (B, 1, 1, S, T + S)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, S, head_dim)
        n_slices = 0 if deepstack is None else deepstack.shape[0]
        new_k, new_v = [], []
        for j, layer in enumerate(self.layers):
            k = (j - deepstack_start) // deepstack_interval
            if n_slices and j >= deepstack_start and k < n_slices:
                h = h.reshape(B * S, d).index_add(0, visual_pos, deepstack[k].to(h.dtype)).view(B, S, d)
            h, kj, vj = layer(h, cos, sin, bias, past_keys[j], past_values[j])
            new_k.append(kj)
            new_v.append(vj)
        return self.norm(h), new_k, new_v
