"""Open and pre-size the images and videos named in chat messages (the original's `utils_vl`).

Same sizing rules as the original qwen-vl-utils copy; videos are read with PyAV instead of
decord/torchvision, and there is no network access: URLs must be downloaded first.
"""

from __future__ import annotations

import base64
import binascii
import math
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from slimm.errors import InputError

IMAGE_FACTOR = 28
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 16384 * 28 * 28
MAX_RATIO = 200

VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = 24576 * 28 * 28
FRAME_FACTOR = 2
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
# The original's recommended reader (decord) keeps at most 32 sampled frames; we do the same.
DECORD_MAX_FRAMES = 32


def round_by_factor(number: float, factor: int) -> int:
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """(height, width) as multiples of `factor` with the area in [min_pixels, max_pixels].

    The original's variant: each side is first rounded (halves to even) and raised to at least
    `factor`; that differs from transformers' smart_resize only for sides under factor/2.
    """
    if height <= 0 or width <= 0:
        raise InputError(f"image of size {width}x{height} (width x height) has no pixels")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        # the original skips this check and fails later inside the vision tower; say it here instead
        raise InputError(
            f"image of size {width}x{height} (width x height) has aspect ratio {ratio:.1f}; "
            f"at most {MAX_RATIO} is supported: crop or pad it first"
        )
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = floor_by_factor(height / beta, factor)
        w_bar = floor_by_factor(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    if h_bar <= 0 or w_bar <= 0:
        raise InputError(
            f"image of size {width}x{height} shrinks to {w_bar}x{h_bar} under max_pixels {max_pixels}: raise max_pixels"
        )
    return h_bar, w_bar


def _no_network(source: str, kind: str) -> InputError:
    return InputError(
        f"{kind} {source}: http(s) URLs are not fetched (this package does no network access); "
        "download the file first and pass its local path"
    )


def _open_image(source: Any) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):  # OpenAI style {"url": ...}
        source = source.get("url", source)
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str):
        raise InputError(
            f"image: expected a local path, file:// URI, data:image base64 URI or PIL image, got {type(source).__name__}"
        )
    if source.startswith(("http://", "https://")):
        raise _no_network(source, "image")
    if source.startswith("data:image"):
        if "base64," not in source:
            raise InputError(f"image {source[:40]}...: only base64 data URIs are supported")
        try:
            data = base64.b64decode(source.split("base64,", 1)[1], validate=False)
        except (binascii.Error, ValueError) as e:
            raise InputError(f"image {source[:40]}...: bad base64 data ({e})") from None
        name, stream = "base64 data URI", BytesIO(data)
    else:
        name = source[7:] if source.startswith("file://") else source
        stream = name
    try:
        return Image.open(stream)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"image {name}: cannot read it as an image ({e})") from None


def fetch_image(ele: dict[str, Any], size_factor: int = IMAGE_FACTOR) -> Image.Image:
    """Open the image of one content item, convert to RGB and resize it to the smart_resize grid."""
    source = ele["image"] if "image" in ele else ele.get("image_url")
    if source is None:
        raise InputError(f"content item {sorted(ele)} names no image ('image' or 'image_url' key)")
    opened = _open_image(source)
    try:
        # convert("RGB") drops alpha (no blending), as the original does; it also forces the decode
        image = opened.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        name = getattr(opened, "filename", "") or (source if isinstance(source, str) else "PIL image")
        raise InputError(f"image {str(name)[:200]}: cannot decode it ({e})") from None
    if "resized_height" in ele and "resized_width" in ele:
        height, width = smart_resize(
            int(ele["resized_height"]), int(ele["resized_width"]), factor=size_factor
        )
    else:
        height, width = smart_resize(
            image.height,
            image.width,
            factor=size_factor,
            min_pixels=ele.get("min_pixels", MIN_PIXELS),
            max_pixels=ele.get("max_pixels", MAX_PIXELS),
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
    if not FRAME_FACTOR <= nframes <= total_frames:
        raise InputError(
            f"video: {nframes} frames requested but the video has {total_frames}; "
            f"the count must lie in [{FRAME_FACTOR}, {total_frames}]"
        )
    return nframes


def _read_video_pyav(ele: dict[str, Any]) -> torch.Tensor:
    """Sampled frames of a video file as a uint8 T x C x H x W tensor."""
    try:
        import av
    except ImportError:
        raise InputError("reading video files needs PyAV: pip install av (or slimm[video])") from None
    path = ele["video"]
    if path.startswith(("http://", "https://")):
        raise _no_network(path, "video")
    if path.startswith("file://"):
        path = path[7:]
    start, end = ele.get("video_start"), ele.get("video_end")
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
        nframes = min(DECORD_MAX_FRAMES, smart_nframes(ele, total_frames=total, video_fps=fps))
        # torch.linspace in float32 then round (halves to even), exactly as the original picks frames
        wanted = torch.linspace(0, total - 1, nframes).round().long().tolist()
        slots: dict[int, list[int]] = {}
        for slot, idx in enumerate(wanted):
            slots.setdefault(idx, []).append(slot)
        out: list[np.ndarray | None] = [None] * nframes
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
                if k > wanted[-1]:
                    break
    except (OSError, ValueError, av.FFmpegError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"video {path}: cannot read it ({e})") from None
    if last is None:
        raise InputError(f"video {path}: no frames could be decoded")
    # a container that promised more frames than it decodes: repeat the last one decoded
    frames = [f if f is not None else last for f in out]
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def _resize_video(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's tensor resize on uint8: float bicubic with antialias, clamp, round."""
    if tuple(video.shape[-2:]) == (height, width):
        return video.float()
    out = F.interpolate(
        video.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )
    return out.clamp_(0, 255).round_()


def fetch_video(ele: dict[str, Any], image_factor: int = IMAGE_FACTOR) -> torch.Tensor | list[Image.Image]:
    """A video file -> float T x C x H x W tensor (0..255); a list of frames -> list of PIL images."""
    source = ele["video"]
    if isinstance(source, Path):
        source = str(source)
    if isinstance(source, str):
        video = _read_video_pyav({**ele, "video": source})
        nframes, _, height, width = video.shape
        min_pixels = ele.get("min_pixels", VIDEO_MIN_PIXELS)
        total_pixels = ele.get("total_pixels", VIDEO_TOTAL_PIXELS)
        max_pixels = max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
        max_pixels = ele.get("max_pixels", max_pixels)
        if "resized_height" in ele and "resized_width" in ele:
            rh, rw = smart_resize(int(ele["resized_height"]), int(ele["resized_width"]), factor=image_factor)
        else:
            rh, rw = smart_resize(
                height, width, factor=image_factor, min_pixels=min_pixels, max_pixels=max_pixels
            )
        return _resize_video(video, rh, rw)
    if not isinstance(source, list | tuple):
        raise InputError(f"video: expected a file path or a list of frames, got {type(source).__name__}")
    if not source:
        raise InputError("video: the frame list is empty")
    # each frame goes through fetch_image with the item's own options (the image pixel bounds)
    options = {k: v for k, v in ele.items() if k not in ("type", "video")}
    frames = [fetch_image({"image": frame, **options}, size_factor=image_factor) for frame in source]
    padded = ceil_by_factor(len(frames), FRAME_FACTOR)
    frames.extend([frames[-1]] * (padded - len(frames)))
    return frames


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
) -> tuple[list[Image.Image] | None, list[torch.Tensor | list[Image.Image]] | None]:
    """Open every image and video the messages name; None for a kind that does not occur."""
    images: list[Image.Image] = []
    videos: list[torch.Tensor | list[Image.Image]] = []
    for info in extract_vision_info(conversations):
        if "image" in info or "image_url" in info:
            images.append(fetch_image(info))
        elif "video" in info:
            videos.append(fetch_video(info))
        else:
            raise InputError(
                f"content item of type {info.get('type')!r} needs an 'image', 'image_url' or 'video' key"
            )
    return images or None, videos or None
