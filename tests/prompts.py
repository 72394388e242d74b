"""Hand-built model inputs for any SliMM config (no processor): chat-shaped prompts with image and
video placeholders, random patch rows of the right width, left padding for batches."""

from __future__ import annotations

import numpy as np

from slimm.config import SliMMConfig

IM_START, IM_END, NL, PAD = 151644, 151645, 198, 151643

# named cases shared by the backend parity tests: lists of prompts; items are text lengths (int)
# or ("image" | "video", (t, h, w)) with the processor grid (Efficient counts 28-px patches)
CASES = {
    "image": [[("image", (1, 4, 6)), 5]],
    "two_images": [[3, ("image", (1, 4, 6)), 2, ("image", (1, 6, 4)), 4]],
    "text": [[9]],
    "batch2": [[("image", (1, 4, 6)), 6], [2, ("image", (1, 6, 4)), 1]],
    "video": [[("video", (2, 4, 4)), 4]],
}


def make_inputs(cfg: SliMMConfig, prompts, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows, grids = [], {"image": [], "video": []}
    token = {"image": cfg.image_token_id, "video": cfg.video_token_id}
    for p in prompts:
        ids = [IM_START, 872, NL]
        for item in p:
            if isinstance(item, int):
                ids += rng.integers(100, 5000, item).tolist()
            else:
                kind, g = item
                ids += (
                    [cfg.vision_start_token_id]
                    + [token[kind]] * (int(np.prod(g)) // 4)
                    + [cfg.vision_end_token_id]
                )
                grids[kind].append(g)
        rows.append(ids + [IM_END, NL, IM_START, 77091, NL])
    S = max(len(r) for r in rows)
    input_ids = np.full((len(rows), S), PAD, np.int64)
    mask = np.zeros((len(rows), S), np.int64)
    for b, r in enumerate(rows):
        input_ids[b, S - len(r) :] = r
        mask[b, S - len(r) :] = 1
    out = {"input_ids": input_ids, "attention_mask": mask}
    v = cfg.vision
    patch = v.patch_size * (2 if cfg.deepstack_type == "efficient" else 1)
    width = v.in_channels * v.temporal_patch_size * patch * patch
    for kind, pix, grid in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        if grids[kind]:
            n = sum(int(np.prod(g)) for g in grids[kind])
            out[pix] = rng.standard_normal((n, width)).astype(np.float32)
            out[grid] = np.array(grids[kind], np.int64)
    return out


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
