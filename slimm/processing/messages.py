"""The images and videos named in chat messages, opened and pre-sized by the rules of qwen-vl-utils
(`process_vision_info`, which the original SliMM copied): pixel budgets, frame sampling, padding.
NumPy and PIL only; `slimm.model.utils_vl` is the original-API layer over this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from slimm.errors import InputError
from slimm.processing.image import load_image, smart_resize
from slimm.processing.video import list_frames, read_video_file

IMAGE_FACTOR = 28
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 16384 * 28 * 28

VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = 24576 * 28 * 28
FRAME_FACTOR = 2
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
# The original's recommended reader (decord) keeps at most 32 sampled frames; we do the same.
DECORD_MAX_FRAMES = 32

ROUNDING = "qwen-vl-utils"  # smart_resize's rounding for everything sized here
# The original's fetch_image (qwen-vl-utils) opens the image and calls convert("RGB"): it never
# applies the EXIF orientation (transformers' load_image does). The original-API layer
# (slimm.model.utils_vl, SliMMQwen2VLProcessor) keeps that, so a phone photo comes out as stored;
# this module's own default, used by the CLI, turns it upright.
ORIGINAL_EXIF_TRANSPOSE = False


def round_by_factor(number: float, factor: int) -> int:
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def fetch_image(
    ele: dict[str, Any], size_factor: int = IMAGE_FACTOR, *, exif_transpose: bool = True
) -> Image.Image:
    """Open the image of one content item, as RGB, resized to its smart_resize grid."""
    source = ele["image"] if "image" in ele else ele.get("image_url")
    if source is None:
        raise InputError(f"content item {sorted(ele)} names no image ('image' or 'image_url' key)")
    if isinstance(source, dict):  # OpenAI style {"url": ...}
        source = source.get("url", source)
    image = load_image(source, exif_transpose=exif_transpose)
    if "resized_height" in ele and "resized_width" in ele:
        height, width = smart_resize(
            int(ele["resized_height"]),
            int(ele["resized_width"]),
            size_factor,
            MIN_PIXELS,
            MAX_PIXELS,
            rounding=ROUNDING,
        )
    else:
        height, width = smart_resize(
            image.height,
            image.width,
            factor=size_factor,
            min_pixels=ele.get("min_pixels", MIN_PIXELS),
            max_pixels=ele.get("max_pixels", MAX_PIXELS),
            rounding=ROUNDING,
        )
    # no filter argument: PIL's default (bicubic for RGB), which is what the original relied on
    return image.resize((width, height))


def smart_nframes(ele: dict[str, Any], total_frames: int, video_fps: int | float) -> int:
    """How many frames to sample: `nframes`, or `fps` (default 2) within [min_frames, max_frames], even."""
    if "fps" in ele and "nframes" in ele:
        raise InputError("video: give either 'fps' or 'nframes', not both")
    if "nframes" in ele:
        nframes = round_by_factor(ele["nframes"], FRAME_FACTOR)
    else:
        fps = ele.get("fps", FPS)
        min_frames = ceil_by_factor(ele.get("min_frames", FPS_MIN_FRAMES), FRAME_FACTOR)
        max_frames = floor_by_factor(ele.get("max_frames", min(FPS_MAX_FRAMES, total_frames)), FRAME_FACTOR)
        nframes = total_frames / video_fps * fps
        nframes = min(max(nframes, min_frames), max_frames)
        nframes = round_by_factor(nframes, FRAME_FACTOR)
    if total_frames < FRAME_FACTOR and "nframes" not in ele:
        # a one-frame video: its frame twice, as a one-frame folder is padded (the original refused it)
        return FRAME_FACTOR
    if not FRAME_FACTOR <= nframes <= total_frames:
        raise InputError(
            f"video: {nframes} frames requested but the video has {total_frames}; "
            f"the count must lie in [{FRAME_FACTOR}, {total_frames}]"
        )
    return nframes


def spread_indices(total: int, nframes: int) -> list[int]:
    """`nframes` frame indices spread evenly over 0..total-1, rounded half to even."""
    # float64 here; the original's torch.linspace works in float32. They agree whenever nframes is
    # even (no exact halves can occur) and float32 is within 1/(2*(nframes-1)) of the exact value.
    return [int(i) for i in np.rint(np.linspace(0, total - 1, nframes))]


def read_video(ele: dict[str, Any], indices: Callable[[int, int], list[int]] = spread_indices) -> np.ndarray:
    """The sampled frames of a content item's video file, T x H x W x 3 uint8 at the file's size."""

    def choose(total: int, fps: float) -> list[int]:
        return indices(total, min(DECORD_MAX_FRAMES, smart_nframes(ele, total_frames=total, video_fps=fps)))

    return read_video_file(ele["video"], choose, ele.get("video_start"), ele.get("video_end"))


def video_size(ele: dict[str, Any], nframes: int, height: int, width: int, factor: int) -> tuple[int, int]:
    """(height, width) of every frame of a video file: the pixel budget shared over its frames."""
    min_pixels = ele.get("min_pixels", VIDEO_MIN_PIXELS)
    total_pixels = ele.get("total_pixels", VIDEO_TOTAL_PIXELS)
    max_pixels = max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    max_pixels = ele.get("max_pixels", max_pixels)
    if "resized_height" in ele and "resized_width" in ele:
        # the original sizes resized_height/width within the image bounds, not the video budget
        rh, rw = int(ele["resized_height"]), int(ele["resized_width"])
        return smart_resize(rh, rw, factor, MIN_PIXELS, MAX_PIXELS, rounding=ROUNDING)
    return smart_resize(height, width, factor, min_pixels, max_pixels, rounding=ROUNDING)


def frame_list(ele: dict[str, Any]) -> list[Any] | None:
    """The frames a content item's video names (its list, or the images of its folder); None for a file."""
    source = ele["video"]
    if isinstance(source, str | Path):
        folder = Path(source[7:] if isinstance(source, str) and source.startswith("file://") else source)
        return list_frames(folder) if folder.is_dir() else None
    if not isinstance(source, list | tuple):
        raise InputError(
            f"video: expected a file path, a folder or a list of frames, got {type(source).__name__}"
        )
    return list(source)


def fetch_frames(
    ele: dict[str, Any], factor: int = IMAGE_FACTOR, *, exif_transpose: bool = True
) -> list[Image.Image]:
    """A content item's frames (a list or a folder): each through fetch_image, padded to an even count."""
    source = frame_list(ele)
    if source is None:
        raise InputError(f"video {ele['video']}: a video file, not a list or folder of frames")
    if not source:
        raise InputError("video: the frame list is empty")
    # each frame goes through fetch_image with the item's own options (the image pixel bounds)
    options = {k: v for k, v in ele.items() if k not in ("type", "video")}
    frames = [
        fetch_image({"image": frame, **options}, size_factor=factor, exif_transpose=exif_transpose)
        for frame in source
    ]
    padded = ceil_by_factor(len(frames), FRAME_FACTOR)
    frames.extend([frames[-1]] * (padded - len(frames)))
    return frames


def fetch_video(
    ele: dict[str, Any], factor: int = IMAGE_FACTOR, *, exif_transpose: bool = True
) -> np.ndarray | list[Image.Image]:
    """A video file -> T x H x W x 3 uint8 frames resized with PIL's bicubic; a list or folder of
    frames -> list of PIL images."""
    if frame_list(ele) is not None:
        return fetch_frames(ele, factor, exif_transpose=exif_transpose)
    video = read_video({**ele, "video": str(ele["video"])})
    nframes, height, width, _ = video.shape
    rh, rw = video_size(ele, nframes, height, width, factor)
    if (rh, rw) == (height, width):
        return video
    return np.stack(
        [np.asarray(Image.fromarray(f).resize((rw, rh), Image.Resampling.BICUBIC)) for f in video]
    )


def extract_vision_info(conversations: list[dict] | list[list[dict]]) -> list[dict]:
    """The image/video content items of one conversation or a batch of them, in order."""
    if not conversations:
        return []
    if isinstance(conversations[0], dict):
        conversations = [conversations]
    infos = []
    for conversation in conversations:
        for message in conversation:
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                continue
            for item in content:
                if not isinstance(item, dict):
                    continue
                if any(k in item for k in ("image", "image_url", "video")) or item.get("type") in (
                    "image",
                    "image_url",
                    "video",
                ):
                    infos.append(item)
    return infos


def process_vision_info(
    conversations: list[dict] | list[list[dict]],
    *,
    exif_transpose: bool = True,
    video_loader: Callable[[dict[str, Any]], Any] | None = None,
) -> tuple[list[Image.Image] | None, list[Any] | None]:
    """Open every image and video the messages name; None for a kind that does not occur.

    `video_loader(item)` replaces fetch_video (the original-API layer reads videos into torch)."""
    images: list[Image.Image] = []
    videos: list[Any] = []
    for info in extract_vision_info(conversations):
        if "image" in info or "image_url" in info:
            images.append(fetch_image(info, exif_transpose=exif_transpose))
        elif "video" in info:
            loaded = video_loader(info) if video_loader else fetch_video(info, exif_transpose=exif_transpose)
            videos.append(loaded)
        else:
            raise InputError(
                f"content item of type {info.get('type')!r} needs an 'image', 'image_url' or 'video' key"
            )
    return images or None, videos or None
