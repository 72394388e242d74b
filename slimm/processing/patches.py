"""Qwen2-VL pixel preprocessing: images and videos resized by `smart_resize`, rescaled,
CLIP-normalised and cut into patch rows in merge-window order (`pixel_values` + `grid_thw`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from slimm.config import PreprocessorConfig
from slimm.errors import CheckpointError, InputError
from slimm.processing.image import describe, flatten_images, load_rgb, smart_resize
from slimm.processing.video import load_video_frames, split_videos


class ImageProcessor:
    """Qwen2-VL preprocessing: resize, rescale, CLIP-normalise, cut into patches in merge-window order.

    `exif_transpose`: turn images and frames (files and PIL images) upright by their EXIF
    orientation, as transformers' load_image does; phone photos are stored sideways without it.
    """

    def __init__(self, config: PreprocessorConfig | None = None, *, exif_transpose: bool = True):
        self.config = config if config is not None else PreprocessorConfig()
        self.exif_transpose = exif_transpose
        c = self.config
        if c.patch_size <= 0 or c.merge_size <= 0 or c.temporal_patch_size <= 0:
            raise CheckpointError(
                f"preprocessor settings: patch_size {c.patch_size}, merge_size {c.merge_size} and "
                f"temporal_patch_size {c.temporal_patch_size} must all be positive"
            )
        self._mean = np.asarray(c.image_mean, dtype=np.float32).reshape(-1, 1, 1)
        self._std = np.asarray(c.image_std, dtype=np.float32).reshape(-1, 1, 1)
        if self._mean.shape[0] != 3 or self._std.shape[0] != 3:
            raise CheckpointError(
                f"preprocessor settings: image_mean and image_std need 3 values, got {c.image_mean}, {c.image_std}"
            )

    @classmethod
    def from_dir(cls, ckpt_dir: str | Path) -> ImageProcessor:
        """From a checkpoint's preprocessor_config.json; defaults when the file is absent."""
        return cls(PreprocessorConfig.from_dir(ckpt_dir))

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def merge_size(self) -> int:
        return self.config.merge_size

    @property
    def temporal_patch_size(self) -> int:
        return self.config.temporal_patch_size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        c = self.config
        return smart_resize(height, width, c.patch_size * c.merge_size, c.min_pixels, c.max_pixels)

    def __call__(self, images: Any = None, videos: Any = None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if images is not None:
            items = flatten_images(images)
            out["pixel_values"], out["image_grid_thw"] = self._patchify_all(
                items, self._image_frames, "image"
            )
        if videos is not None:
            items = split_videos(videos)
            out["pixel_values_videos"], out["video_grid_thw"] = self._patchify_all(
                items, self._video_frames, "video"
            )
        return out

    def _image_frames(self, i: int, image: Any) -> np.ndarray:
        what = f"image {i} ({describe(image)})"
        return load_rgb(image, what, exif_transpose=self.exif_transpose)[None]

    def _video_frames(self, i: int, video: Any) -> np.ndarray:
        return load_video_frames(video, f"video {i}", exif_transpose=self.exif_transpose)

    def _patchify_all(
        self, items: list[Any], frames_of: Callable[[int, Any], np.ndarray], kind: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every image or video: patch rows stacked, one grid row each."""
        if not items:
            raise InputError(f"{kind}s: empty list; pass None for no {kind}s")
        rows, grids = [], []
        for i, item in enumerate(items):
            patches, grid = self._patchify_frames(frames_of(i, item), f"{kind} {i}")
            rows.append(patches)
            grids.append(grid)
        return np.concatenate(rows, axis=0), np.asarray(grids, dtype=np.int64)

    def _patchify_frames(self, frames: np.ndarray, what: str) -> tuple[np.ndarray, list[int]]:
        """T x H x W x 3 uint8 -> rows [grid_t*grid_h*grid_w, C*T*P*P] float32 and (grid_t, grid_h, grid_w)."""
        c = self.config
        P, m, Tp = c.patch_size, c.merge_size, c.temporal_patch_size
        _, h, w, _ = frames.shape
        try:
            th, tw = self.target_size(h, w)
        except InputError as e:
            raise InputError(f"{what}: {e}") from None
        if (th, tw) != (h, w):
            frames = np.stack(
                [np.asarray(Image.fromarray(f).resize((tw, th), Image.Resampling.BICUBIC)) for f in frames]
            )
        # same arithmetic as transformers: rescale in float64, then float32 from there on
        x = (frames.astype(np.float64) * (1 / 255)).astype(np.float32)
        x = np.transpose(x, (0, 3, 1, 2))  # (T, C, H, W)
        x = (x - self._mean) / self._std
        # an image becomes Tp identical frames; a video is padded with its last frame to a multiple of Tp
        if x.shape[0] % Tp:
            pad = Tp - x.shape[0] % Tp
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)
        T, C = x.shape[0], x.shape[1]
        gt, gh, gw = T // Tp, th // P, tw // P
        x = x.reshape(gt, Tp, C, gh // m, m, P, gw // m, m, P)
        # -> (gt, gh/m, gw/m, m, m, C, Tp, P, P): the m x m patches of one merge window are adjacent rows
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return np.ascontiguousarray(x.reshape(gt * gh * gw, C * Tp * P * P)), [gt, gh, gw]
