"""One video to frames: a frame list, a T x H x W x C array or a T x C x H x W torch tensor to
T x H x W x 3 uint8; sampled frames of a video file (PyAV); telling one video from a list of them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from slimm.errors import InputError
from slimm.host.arrays import is_torch_tensor
from slimm.processing.image import load_rgb, no_network, rgb_from_hwc

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def list_frames(folder: str | Path) -> list[str]:
    """The image files of a frame folder in order: numbers in names compare as numbers, so
    frame_2 comes before frame_10."""
    folder = Path(folder)

    def key(path: Path) -> tuple[list[Any], str]:
        # re.split with a group alternates text and digit runs, so the pieces compare type by type
        parts = re.split(r"(\d+)", path.name)
        return [int(p) if i % 2 else p for i, p in enumerate(parts)], path.name

    frames = sorted((f for f in folder.iterdir() if f.suffix.lower() in FRAME_SUFFIXES), key=key)
    if not frames:
        raise InputError(f"{folder}: directory holds no {'/'.join(FRAME_SUFFIXES)} frames")
    return [str(f) for f in frames]


def as_video_list(videos: Any) -> list[Any]:
    """`videos` as given to prepare / stream: None, one video, or a list of videos."""
    if videos is None or (isinstance(videos, list | tuple) and not videos):
        return []
    return split_videos(videos)


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


def load_video_frames(video: Any, what: str = "video", *, exif_transpose: bool = True) -> np.ndarray:
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
        frames = [
            load_rgb(f, f"{what} frame {i}", exif_transpose=exif_transpose) for i, f in enumerate(video)
        ]
    else:
        raise InputError(f"{what}: expected a list of frames or a 4-D array, got {type(video).__name__}")
    if not frames:
        raise InputError(f"{what}: has no frames")
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise InputError(f"{what}: frames differ in size {sorted(sizes)}; all frames of a video must match")
    return np.stack(frames)


def read_video_file(
    path: str | Path,
    choose: Callable[[int, float], list[int]],
    start: float | None = None,
    end: float | None = None,
) -> np.ndarray:
    """Frames of a video file as T x H x W x 3 uint8. `choose(total, fps)` picks which of the `total`
    frames between `start` and `end` (seconds) to keep, by index in time order, repeats allowed."""
    try:
        import av
    except ImportError:
        raise InputError("reading video files needs PyAV: pip install av (or slimm[video])") from None
    path = str(path)
    if path.startswith(("http://", "https://")):
        raise no_network(path, "video")
    if path.startswith("file://"):
        path = path[7:]
    try:
        # first pass, demux only: the presentation times of all frames, to count and place them
        with av.open(path) as container:
            if not container.streams.video:
                raise InputError(f"video {path}: the file has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            time_base = float(stream.time_base) if stream.time_base else None
            pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size)
        if time_base is None or not pts:
            raise InputError(f"video {path}: no decodable frames found")
        times = [p * time_base for p in pts]
        keep = [(start is None or t >= start) and (end is None or t <= end) for t in times]
        total = sum(keep)
        if total == 0:
            raise InputError(f"video {path}: no frames between video_start {start} and video_end {end}")
        fps = float(rate) if rate else total / max(times[-1] - times[0], 1e-6)
        wanted = choose(total, fps)
        slots: dict[int, list[int]] = {}
        for slot, idx in enumerate(wanted):
            slots.setdefault(idx, []).append(slot)
        out: list[np.ndarray | None] = [None] * len(wanted)
        last = None
        with av.open(path) as container:
            k = 0
            for frame in container.decode(video=0):
                t = frame.time
                if t is not None and ((start is not None and t < start) or (end is not None and t > end)):
                    continue
                if k in slots:
                    last = frame.to_ndarray(format="rgb24")
                    for slot in slots[k]:
                        out[slot] = last
                k += 1
                if k > max(wanted):
                    break
    except (OSError, ValueError, av.FFmpegError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"video {path}: cannot read it ({e})") from None
    if last is None:
        raise InputError(f"video {path}: no frames could be decoded")
    # a container that promised more frames than it decodes: repeat the last one decoded
    return np.stack([f if f is not None else last for f in out])
