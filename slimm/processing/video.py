"""One video to frames: a frame list, a T x H x W x C array or a T x C x H x W torch tensor to
T x H x W x 3 uint8, and telling one video from a list of videos.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from slimm.errors import InputError
from slimm.host.arrays import is_torch_tensor
from slimm.processing.image import load_rgb, rgb_from_hwc


def is_frame(x: Any) -> bool:
    if isinstance(x, Image.Image | str | Path):
        return True
    return getattr(x, "ndim", None) in (2, 3)


def split_videos(videos: Any) -> list[Any]:
    """A single video (frame list or 4-D array) or a list of them -> list of videos."""
    if getattr(videos, "ndim", None) == 4:
        return [videos]
    if isinstance(videos, list | tuple):
        if videos and all(is_frame(v) for v in videos):
            return [videos]
        return list(videos)
    raise InputError(
        f"videos: expected a list of frames, a 4-D array or a list of those, got {type(videos).__name__}"
    )


def load_video_frames(video: Any, what: str = "video") -> np.ndarray:
    """One video (frame list, T x H x W x C array, T x C x H x W torch tensor) as T x H x W x 3 uint8."""
    if is_torch_tensor(video):
        arr = video.detach().cpu().numpy()
        if arr.ndim != 4:
            raise InputError(f"{what}: expected a T x C x H x W tensor, got shape {tuple(arr.shape)}")
        frames = [rgb_from_hwc(np.moveaxis(f, 0, -1), f"{what} frame {i}") for i, f in enumerate(arr)]
    elif isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise InputError(f"{what}: expected a T x H x W x C array, got shape {video.shape}")
        frames = [rgb_from_hwc(f, f"{what} frame {i}") for i, f in enumerate(video)]
    elif isinstance(video, list | tuple):
        frames = [load_rgb(f, f"{what} frame {i}") for i, f in enumerate(video)]
    else:
        raise InputError(f"{what}: expected a list of frames or a 4-D array, got {type(video).__name__}")
    if not frames:
        raise InputError(f"{what}: has no frames")
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise InputError(f"{what}: frames differ in size {sorted(sizes)}; all frames of a video must match")
    return np.stack(frames)
