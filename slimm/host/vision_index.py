"""Host-side vision bookkeeping in NumPy, shared by every backend: from `grid_thw` to the index
tensors the vision encoder takes (2-D rotary positions, frame ids, Efficient's row orders).
"""

from __future__ import annotations

import numpy as np


def grid_list(grid_thw) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in row) for row in np.asarray(grid_thw).reshape(-1, 3)]


def vision_rotary_ids(grid_thw, merge: int) -> np.ndarray:
    """(row, col) of every patch, listed in merge-window order like the pixel rows: (N, 2) int64."""
    out = []
    for t, h, w in grid_list(grid_thw):
        rows = np.broadcast_to(np.arange(h)[:, None], (h, w))
        cols = np.broadcast_to(np.arange(w)[None, :], (h, w))
        ids = []
        for a in (rows, cols):
            # (h, w) -> (h/m, w/m, m, m): windows of m x m patches, windows in raster order
            ids.append(a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1))
        out.append(np.tile(np.stack(ids, axis=1), (t, 1)))
    return np.concatenate(out).astype(np.int64)


def vision_frame_ids(grid_thw) -> np.ndarray:
    """Which frame of which image each patch belongs to: attention stays within one frame. (N,) int64."""
    out, frame = [], 0
    for t, h, w in grid_list(grid_thw):
        for _ in range(t):
            out.append(np.full(h * w, frame, dtype=np.int64))
            frame += 1
    return np.concatenate(out)


def vision_chunks(grid_thw) -> list[int]:
    """Patches per frame, in order (the `cu_seqlens` differences)."""
    return [h * w for t, h, w in grid_list(grid_thw) for _ in range(t)]


def efficient_pixel_index(grid_thw, merge: int) -> np.ndarray:
    """Rows of the processor's 2P-pixel patches, from merge-window order back to raster order."""
    out, offset = [], 0
    for t, h, w in grid_list(grid_thw):
        idx = np.arange(t * h * w).reshape(t, h // merge, w // merge, merge, merge)
        out.append(idx.transpose(0, 1, 3, 2, 4).reshape(-1) + offset)  # (t, h/m, m, w/m, m) = raster
        offset += t * h * w
    return np.concatenate(out).astype(np.int64)


def efficient_coarse_index(grid_thw) -> np.ndarray:
    """For the processor grid (t, h, w): window indices, each 2x2 group of windows consecutive,
    groups in raster order of (h/2, w/2). Split per image by t*h*w (the original used h*w)."""
    out, offset = [], 0
    for t, h, w in grid_list(grid_thw):
        idx = np.arange(t * h * w).reshape(t, h // 2, 2, w // 2, 2)
        out.append(idx.transpose(0, 1, 3, 2, 4).reshape(-1) + offset)
        offset += t * h * w
    return np.concatenate(out).astype(np.int64)


def vision_host_inputs(deepstack_type: str | None, merge: int, grid_thw) -> dict[str, np.ndarray]:
    """Everything the vision encoder (SliMM_B) takes besides the pixel rows."""
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    out = {}
    if deepstack_type == "efficient":
        out["pixel_index"] = efficient_pixel_index(grid, merge)
        out["coarse_index"] = efficient_coarse_index(grid)
        grid = grid * np.array([1, 2, 2])  # the tower sees 2x2 sub-patches of each processor patch
    out["rotary_ids"] = vision_rotary_ids(grid, merge)
    out["frame_ids"] = vision_frame_ids(grid)
    return out


def tower_grid(deepstack_type: str | None, grid_thw) -> np.ndarray:
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    return grid * np.array([1, 2, 2]) if deepstack_type == "efficient" else grid
