"""Placeholder expansion: each <|image_pad|> / <|video_pad|> the chat template writes becomes one
token per LLM token of its image or video (the grid's t*h*w / merge_size**2).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slimm.errors import InputError
from slimm.host.positions import grid_rows

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"


def expand_vision_placeholders(
    texts: list[str], image_grid_thw: Any, video_grid_thw: Any, merge_size: int
) -> list[str]:
    """Repeat each <|image_pad|> / <|video_pad|> once per LLM token of its image / video.

    Items are consumed in order across the whole batch; the counts of placeholders and of
    items must agree.
    """
    out = list(texts)
    for pad, grid, kind in ((IMAGE_PAD, image_grid_thw, "image"), (VIDEO_PAD, video_grid_thw, "video")):
        grids = grid_rows(grid, f"{kind}_grid_thw")
        found = sum(t.count(pad) for t in out)
        if found != len(grids):
            raise InputError(
                f"the text holds {found} {pad} placeholder(s) but {len(grids)} {kind}(s) were given; "
                f"each {kind} needs exactly one placeholder (the chat template writes one per {kind} item)"
            )
        if not found:
            continue
        counts = []
        for i, g in enumerate(grids):
            n, rem = divmod(int(np.prod(g)), merge_size * merge_size)
            if rem or n <= 0:
                raise InputError(
                    f"{kind} {i}: grid {g.tolist()} does not split into {merge_size}x{merge_size} windows"
                )
            counts.append(n)
        k = 0
        for b, text in enumerate(out):
            pieces = text.split(pad)
            joined = [pieces[0]]
            for piece in pieces[1:]:
                joined.append(pad * counts[k])
                joined.append(piece)
                k += 1
            out[b] = "".join(joined)
    return out
