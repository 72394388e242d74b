"""Patch mergers: vision tokens -> LLM width, plus the DeepStack slices of each variant.

Every merger returns (main tokens (L, d), DeepStack slices (K, L, d) or None). The
`efficient` variant's row orderings are index arrays computed on the host (slimm/host/vision_index.py).
"""

from __future__ import annotations

import torch
from torch import nn

from slimm.config import MIDLAYER_FEATURE_INDICES, SliMMConfig


def _mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    # indices 0 and 2 match the checkpoint names mlp.0 / mlp.2
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out))


def _ln(c: int) -> nn.LayerNorm:
    return nn.LayerNorm(c, eps=1e-6)


class PatchMerger(nn.Module):
    """ln_q -> m*m neighbouring patches concatenated -> MLP. Used alone when DeepStack is off."""

    def __init__(self, c: int, d: int, m: int) -> None:
        super().__init__()
        self.width = c * m * m
        self.ln_q = _ln(c)
        self.mlp = _mlp(self.width, self.width, d)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.width))  # (N/m^2, d)

    def forward(self, x: torch.Tensor, recorded: list[torch.Tensor]):
        return self.merge(x), None


class DeepStackV1Merger(PatchMerger):
    """Slices from the per-patch MLP on ln_q(x): slice k holds each token's k-th sub-patch.

    `ln_q_deepstack` exists in the checkpoints but the original never uses it.
    """

    def __init__(self, c: int, d: int, m: int) -> None:
        super().__init__(c, d, m)
        self.ln_q_deepstack = _ln(c)
        self.mlp_deepstack = _mlp(c, c, d)

    def forward(self, x, recorded):
        main = self.merge(x)  # (L, d)
        fine = self.mlp_deepstack(self.ln_q(x))  # (L*m^2, d)
        return main, fine.view(main.shape[0], -1, main.shape[1]).transpose(0, 1)  # (m^2, L, d)


class MidLayerMerger(PatchMerger):
    """Slices from the inputs of vision blocks 8, 16, 24, 30, each through its own ln + MLP."""

    def __init__(self, c: int, d: int, m: int) -> None:
        super().__init__(c, d, m)
        n = len(MIDLAYER_FEATURE_INDICES)
        self.ln_q_deepstack_list = nn.ModuleList(_ln(c) for _ in range(n))
        self.mlp_deepstack_list = nn.ModuleList(_mlp(self.width, self.width, d) for _ in range(n))

    def forward(self, x, recorded):
        main = self.merge(x)
        slices = [
            mlp(ln(feat).view(-1, self.width))
            for feat, ln, mlp in zip(recorded, self.ln_q_deepstack_list, self.mlp_deepstack_list, strict=True)
        ]
        return main, torch.stack(slices)  # (4, L, d)


class EfficientMerger(PatchMerger):
    """DeepStack-Efficient: the default merger gives FINE tokens (one per 2x2 window); COARSE tokens
    (the LLM sequence) merge each 2x2 group of windows of the raw tower output.

    `coarse_index` lists the windows in the order the coarse MLP reads them (see
    efficient_coarse_index). The slices are the fine tokens taken in runs of four in raster order,
    which is what the original does (not the 2x2 group of the coarse token).
    """

    def __init__(self, c: int, d: int, m: int) -> None:
        super().__init__(c, d, m)
        self.c = c
        self.ln_q_deepstack = _ln(c)
        self.mlp_deepstack = _mlp(4 * self.width, self.width, d)

    def forward(self, x, recorded, coarse_index: torch.Tensor):
        fine = self.merge(x)  # (W, d): one per window, windows in raster order
        windows = x.view(-1, self.width)[coarse_index]  # (W, m^2 c), grouped 2x2 in raster order
        groups = self.ln_q_deepstack(windows.view(-1, self.width // self.c, self.c)).view(-1, 4 * self.width)
        coarse = self.mlp_deepstack(groups)  # (L = W/4, d)
        return coarse, fine.view(coarse.shape[0], -1, fine.shape[1]).transpose(0, 1)  # (4, L, d)


MERGERS = {
    None: PatchMerger,
    "v1": DeepStackV1Merger,
    "midlayers": MidLayerMerger,
    "efficient": EfficientMerger,
}


def build_merger(cfg: SliMMConfig) -> PatchMerger:
    return MERGERS[cfg.deepstack_type](cfg.vision.embed_dim, cfg.text.hidden_size, cfg.spatial_merge_size)


def efficient_split_patches(
    pixels: torch.Tensor, in_channels: int, temporal: int, patch: int
) -> torch.Tensor:
    """Cut each 2P x 2P patch row into its 2x2 sub-patches of P pixels (raster order within)."""
    ct = in_channels * temporal
    x = pixels.view(-1, ct, 2, patch, 2, patch)  # (R, CT, hs, P, ws, P)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, ct * patch * patch)  # (4R, CT*P*P)
