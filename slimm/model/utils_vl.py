"""Open and pre-size the images and videos named in chat messages (the original's `utils_vl`).

A layer over slimm.processing.messages (the same sizing rules, written once) that answers as the
original did: videos read from files come back as float torch tensors resized the torchvision way.
Videos are read with PyAV instead of decord/torchvision; no network access: download URLs first.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from slimm.processing import image as _image
from slimm.processing import messages
from slimm.processing.image import MAX_ASPECT_RATIO as MAX_RATIO  # noqa: F401
from slimm.processing.messages import (  # noqa: F401
    DECORD_MAX_FRAMES,
    FPS,
    FPS_MAX_FRAMES,
    FPS_MIN_FRAMES,
    FRAME_FACTOR,
    IMAGE_FACTOR,
    MAX_PIXELS,
    MIN_PIXELS,
    ORIGINAL_EXIF_TRANSPOSE,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VIDEO_TOTAL_PIXELS,
    ceil_by_factor,
    extract_vision_info,
    floor_by_factor,
    round_by_factor,
    smart_nframes,
)


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """(height, width) as multiples of `factor` with the area in [min_pixels, max_pixels].

    The original's variant (`rounding="qwen-vl-utils"` of slimm.processing.image.smart_resize): it
    differs from transformers' only for sides under factor/2 and a max_pixels under factor**2.
    """
    return _image.smart_resize(height, width, factor, min_pixels, max_pixels, rounding=messages.ROUNDING)


def fetch_image(ele: dict[str, Any], size_factor: int = IMAGE_FACTOR) -> Image.Image:
    """Open the image of one content item, convert to RGB and resize it to the smart_resize grid."""
    return messages.fetch_image(ele, size_factor, exif_transpose=ORIGINAL_EXIF_TRANSPOSE)


def _torch_linspace_indices(total: int, nframes: int) -> list[int]:
    # torch.linspace in float32 then round (halves to even), exactly as the original picks frames
    return torch.linspace(0, total - 1, nframes).round().long().tolist()


def _resize_video(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's tensor resize on uint8: float bicubic with antialias, clamp, round."""
    if tuple(video.shape[-2:]) == (height, width):
        return video.float()
    out = F.interpolate(
        video.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )
    return out.clamp_(0, 255).round_()


def fetch_video(ele: dict[str, Any], image_factor: int = IMAGE_FACTOR) -> torch.Tensor | list[Image.Image]:
    """A video file -> float T x C x H x W tensor (0..255); a list or folder of frames -> PIL images."""
    if messages.frame_list(ele) is not None:
        return messages.fetch_frames(ele, image_factor, exif_transpose=ORIGINAL_EXIF_TRANSPOSE)
    frames = messages.read_video({**ele, "video": str(ele["video"])}, _torch_linspace_indices)
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    nframes, _, height, width = video.shape
    return _resize_video(video, *messages.video_size(ele, nframes, height, width, image_factor))


def process_vision_info(
    conversations: list[dict] | list[list[dict]],
) -> tuple[list[Image.Image] | None, list[torch.Tensor | list[Image.Image]] | None]:
    """Open every image and video the messages name; None for a kind that does not occur."""
    return messages.process_vision_info(
        conversations, exif_transpose=ORIGINAL_EXIF_TRANSPOSE, video_loader=fetch_video
    )
