"""M-RoPE position ids in NumPy, written once for the PyTorch model and the parts runtime: three
rows (t, h, w) per token, each visual block laid out on its (t, h, w) grid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from slimm.config import QWEN2_SPECIAL_TOKENS
from slimm.errors import InputError
from slimm.host.arrays import as_numpy

if TYPE_CHECKING:
    from slimm.config import SliMMConfig


def grid_rows(grid: Any, name: str) -> np.ndarray:
    """A `*_grid_thw` (None, list, array or tensor) as an int64 [n, 3] array; [0, 3] for none."""
    if grid is None:
        return np.zeros((0, 3), dtype=np.int64)
    arr = as_numpy(grid).astype(np.int64)
    if arr.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise InputError(f"{name}: expected shape [n, 3] (t, h, w per item), got {arr.shape}")
    return arr


def _int_rows(x: Any, name: str) -> np.ndarray:
    arr = as_numpy(x)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise InputError(f"{name}: expected shape [batch, seq], got {arr.shape}")
    return arr.astype(np.int64)


def get_rope_index(
    input_ids: Any,
    image_grid_thw: Any = None,
    video_grid_thw: Any = None,
    attention_mask: Any = None,
    *,
    spatial_merge_size: int = 2,
    image_token_id: int = QWEN2_SPECIAL_TOKENS["image_token_id"],
    video_token_id: int = QWEN2_SPECIAL_TOKENS["video_token_id"],
    vision_start_token_id: int = QWEN2_SPECIAL_TOKENS["vision_start_token_id"],
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE position ids [3, B, S] and rope deltas [B, 1], as the original SliMM computes them.

    Padded positions hold 1. A visual block placed after `s` positions gets (t, h, w) indices + s
    (video t unscaled); the text after it continues from the largest position so far + 1.
    The delta is max position + 1 - S (S the padded length), so decode step p sits at p + delta.
    """
    ids = _int_rows(input_ids, "input_ids")
    B, S = ids.shape
    mask = None if attention_mask is None else _int_rows(attention_mask, "attention_mask")
    if mask is not None and mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {mask.shape} but input_ids {ids.shape}")

    if image_grid_thw is None and video_grid_thw is None:
        if mask is None:
            pos = np.broadcast_to(np.arange(S, dtype=np.int64), (3, B, S)).copy()
            return pos, np.zeros((B, 1), dtype=np.int64)
        row = np.cumsum(mask, axis=-1) - 1
        row[mask == 0] = 1
        delta = row.max(axis=-1, keepdims=True) + 1 - S
        return np.broadcast_to(row, (3, B, S)).copy(), delta.astype(np.int64)

    grids = {
        "image": grid_rows(image_grid_thw, "image_grid_thw"),
        "video": grid_rows(video_grid_thw, "video_grid_thw"),
    }
    used = {"image": 0, "video": 0}
    m = spatial_merge_size
    position_ids = np.ones((3, B, S), dtype=np.int64)
    deltas = np.zeros((B, 1), dtype=np.int64)
    for b in range(B):
        valid = np.ones(S, dtype=bool) if mask is None else mask[b] == 1
        tokens = ids[b][valid]
        n = len(tokens)
        # which visual items this row holds: the token right after each <|vision_start|>
        starts = np.flatnonzero(tokens == vision_start_token_id)
        after = tokens[starts[starts + 1 < n] + 1]
        remaining = {
            "image": int((after == image_token_id).sum()),
            "video": int((after == video_token_id).sum()),
        }
        where = {
            "image": np.flatnonzero(tokens == image_token_id),
            "video": np.flatnonzero(tokens == video_token_id),
        }
        chunks: list[np.ndarray] = []
        st, next_pos = 0, 0
        for _ in range(remaining["image"] + remaining["video"]):
            # the earlier of the next image token and the next video token at or after `st`
            ed = {}
            for kind in ("image", "video"):
                k = np.searchsorted(where[kind], st)
                ed[kind] = int(where[kind][k]) if remaining[kind] > 0 and k < len(where[kind]) else n + 1
            kind = "image" if ed["image"] < ed["video"] else "video"
            if ed[kind] > n:
                raise InputError(
                    f"row {b}: a {kind} announced by <|vision_start|> has no {kind} tokens after position {st}"
                )
            if used[kind] >= len(grids[kind]):
                raise InputError(
                    f"the prompts hold more {kind}s than {kind}_grid_thw has rows ({len(grids[kind])})"
                )
            t, h, w = (int(v) for v in grids[kind][used[kind]])
            used[kind] += 1
            remaining[kind] -= 1
            gt, gh, gw = t, h // m, w // m
            text_len = ed[kind] - st
            chunks.append(np.broadcast_to(np.arange(text_len, dtype=np.int64) + next_pos, (3, text_len)))
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
            block = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]).astype(np.int64) + next_pos + text_len
            chunks.append(block)
            next_pos = int(block.max()) + 1 if block.size else next_pos + text_len
            st = ed[kind] + gt * gh * gw
        if st < n:
            chunks.append(np.broadcast_to(np.arange(n - st, dtype=np.int64) + next_pos, (3, n - st)))
        if not chunks:
            deltas[b, 0] = -S  # an empty row: the first generated token would sit at 0
            continue
        positions = np.concatenate(chunks, axis=1)
        if positions.shape[1] != n:
            raise InputError(
                f"row {b}: {n} tokens but the image/video grids account for {positions.shape[1]} positions; "
                "the number of <|image_pad|>/<|video_pad|> tokens does not match image_grid_thw/video_grid_thw"
            )
        position_ids[:, b, valid] = positions
        deltas[b, 0] = int(positions.max()) + 1 - S
    return position_ids, deltas


def model_rope_index(
    config: SliMMConfig,
    input_ids: Any,
    image_grid_thw: Any = None,
    video_grid_thw: Any = None,
    attention_mask: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`get_rope_index` with the merge size and token ids of one model's config."""
    return get_rope_index(
        input_ids,
        image_grid_thw,
        video_grid_thw,
        attention_mask,
        spatial_merge_size=config.spatial_merge_size,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id,
    )
