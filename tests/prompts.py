"""Shared test helpers: hand-built model inputs for any SliMM config (no processor), the Qwen2 token ids
they use, the decoder's feed shapes step by step, relative error, edited copies of JSON files, Python
run in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from slimm.config import SliMMConfig

# Qwen2 tokenizer ids (the released values the demo checkpoints use too)
PAD = ENDOFTEXT = 151643
IM_START, IM_END, NL = 151644, 151645, 198
USER, ASSISTANT = 872, 77091
VS, VE, IMG, VID = 151652, 151653, 151655, 151656  # vision start / end, image and video pads

# named cases shared by the backend parity tests: lists of prompts; items are text lengths (int)
# or ("image" | "video", (t, h, w)) with the processor grid (Efficient counts 28-px patches)
CASES = {
    "image": [[("image", (1, 4, 6)), 5]],
    "two_images": [[3, ("image", (1, 4, 6)), 2, ("image", (1, 6, 4)), 4]],
    "text": [[9]],
    "batch2": [[("image", (1, 4, 6)), 6], [2, ("image", (1, 6, 4)), 1]],
    "video": [[("video", (2, 4, 4)), 4]],
    # longer than the 64 positions of the shortest past slice a step reads (PartsBackend.past_length)
    "long": [[("image", (1, 8, 12)), 90]],
}


def chat(*parts: Sequence[int]) -> list[int]:
    """A user turn holding `parts` (lists of token ids), then the assistant's header."""
    ids = [IM_START, USER, NL]
    for p in parts:
        ids += list(p)
    return ids + [IM_END, NL, IM_START, ASSISTANT, NL]


def vision_block(token: int, grid, merge: int = 2) -> list[int]:
    """<|vision_start|>, one `token` per merged patch of a (t, h, w) grid, <|vision_end|>."""
    return [VS] + [token] * (int(np.prod(grid)) // (merge * merge)) + [VE]


def left_pad(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) of a batch, rows padded on the left with PAD (mask 0)."""
    S = max(len(r) for r in rows)
    ids = np.full((len(rows), S), PAD, np.int64)
    mask = np.zeros((len(rows), S), np.int64)
    for b, r in enumerate(rows):
        ids[b, S - len(r) :] = r
        mask[b, S - len(r) :] = 1
    return ids, mask


def patch_rows(cfg: SliMMConfig, grids, rng: np.random.Generator | int = 0) -> np.ndarray:
    """N(0, 1) pixel_values rows for images/videos of these grids, as wide as the config's patches."""
    v = cfg.vision
    patch = v.patch_size * (2 if cfg.deepstack_type == "efficient" else 1)
    n = sum(int(np.prod(g)) for g in grids)
    width = v.in_channels * v.temporal_patch_size * patch * patch
    return np.random.default_rng(rng).standard_normal((n, width)).astype(np.float32)


def make_inputs(cfg: SliMMConfig, prompts, seed: int = 0) -> dict[str, np.ndarray]:
    """Model inputs for a batch of CASES-style prompts: random text ids, left padding, pixel rows."""
    rng = np.random.default_rng(seed)
    rows, grids = [], {"image": [], "video": []}
    token = {"image": cfg.image_token_id, "video": cfg.video_token_id}
    for p in prompts:
        ids = []
        for item in p:
            if isinstance(item, int):
                ids += rng.integers(100, 5000, item).tolist()
            else:
                kind, g = item
                ids += [cfg.vision_start_token_id] + [token[kind]] * (int(np.prod(g)) // 4)
                ids += [cfg.vision_end_token_id]
                grids[kind].append(g)
        rows.append(chat(ids))
    input_ids, mask = left_pad(rows)
    out = {"input_ids": input_ids, "attention_mask": mask}
    for kind, pix, grid in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        if grids[kind]:
            out[pix] = patch_rows(cfg, grids[kind], rng)
            out[grid] = np.array(grids[kind], np.int64)
    return out


def decoder_feed_shapes(backend, inputs: dict[str, np.ndarray], steps: int) -> list[dict[str, tuple]]:
    """The shapes of every part-F call an ONNX backend makes while generating `steps` tokens greedily
    (the prefill first, then one per decode step)."""
    shapes = []
    real = backend.run_part

    def spy(part, feeds):
        if part == "F":
            shapes.append({k: v.shape for k, v in feeds.items()})
        return real(part, feeds)

    backend.run_part = spy
    backend.generate(**inputs, max_new_tokens=steps, eos_token_id=[])
    return shapes


def rel_err(a, b) -> float:
    """max|a - b| / max|b|, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def cosine(a, b) -> np.ndarray:
    """Cosine similarity of a and b along the last axis (per position), in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def edit_json(path: Path, edit: Callable[[dict], object] | None = None, /, **changes) -> Path:
    """Rewrite a JSON file: set the keys given (None removes one), then let `edit` change the dict."""
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    if edit is not None:
        edit(data)
    path.write_text(json.dumps(data))
    return path


def run_python(
    code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """`python -c code args...` in a fresh process (a fresh import state), output captured as text."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=os.environ if env is None else env,
        timeout=timeout,
        cwd=cwd,
    )
