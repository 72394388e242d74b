"""One image to RGB pixels, and the Qwen2-VL sizing rule: opening files and data URIs, NumPy /
torch arrays to H x W x 3 uint8, and `smart_resize` (the target size of every image and frame).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from slimm.errors import InputError
from slimm.host.arrays import is_torch_tensor

MAX_ASPECT_RATIO = 200  # beyond this smart_resize cannot keep both sides >= one patch window


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Same arithmetic as transformers' Qwen2-VL image processor, including Python's round (halves go
    to even), which decides many real sizes.
    """
    if height <= 0 or width <= 0:
        raise InputError(f"image of size {width}x{height} (width x height) has no pixels")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(
            f"image of size {width}x{height} (width x height) has aspect ratio {ratio:.1f}; "
            f"at most {MAX_ASPECT_RATIO} is supported: crop or pad it first"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar <= 0 or w_bar <= 0:
        raise InputError(
            f"image of size {width}x{height} resizes to {w_bar}x{h_bar} with factor {factor}, "
            f"min_pixels {min_pixels}, max_pixels {max_pixels}: raise min_pixels"
        )
    return h_bar, w_bar


def describe(obj: Any) -> str:
    if isinstance(obj, str | Path):
        return str(obj)
    name = getattr(obj, "filename", "") if isinstance(obj, Image.Image) else ""
    if name:
        return str(name)
    shape = getattr(obj, "shape", None)
    if shape is not None:
        return f"{type(obj).__name__} of shape {tuple(shape)}"
    if isinstance(obj, Image.Image):
        return f"PIL image {obj.width}x{obj.height} mode {obj.mode}"
    return type(obj).__name__


def _uint8_from_float(arr: np.ndarray, what: str) -> np.ndarray:
    # videos arrive as float tensors holding 0..255 (fetch_video's output); PIL needs uint8
    if arr.size and (np.isnan(arr).any() or arr.min() < -0.5 or arr.max() > 255.5):
        raise InputError(
            f"{what}: float pixel values must lie in 0..255, got {arr.min():.3g}..{arr.max():.3g}"
        )
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def rgb_from_hwc(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer):
            arr = _uint8_from_float(arr.astype(np.float64), what)
        else:
            raise InputError(f"{what}: unsupported pixel dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise InputError(f"{what}: expected an H x W x C array with C in (1, 3, 4), got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]  # alpha dropped, like PIL's convert("RGB")
    return np.ascontiguousarray(arr)


def load_rgb(image: Any, what: str = "image") -> np.ndarray:
    """One image (PIL, path, HWC/HW numpy array, CHW torch tensor) as an H x W x 3 uint8 array."""
    if isinstance(image, str | Path):
        try:
            with Image.open(image) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise InputError(f"{what} {image}: cannot read it as an image ({e})") from None
    if isinstance(image, Image.Image):
        try:
            # convert("RGB") drops alpha rather than blending it, as the original pipeline did
            return np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:
            raise InputError(f"{what} {describe(image)}: cannot decode it ({e})") from None
    if is_torch_tensor(image):
        arr = image.detach().cpu().numpy()
        if arr.ndim == 3:
            arr = np.moveaxis(arr, 0, -1)  # torch images are C x H x W
        return rgb_from_hwc(arr, what)
    if isinstance(image, np.ndarray):
        return rgb_from_hwc(image, what)
    raise InputError(f"{what}: expected a PIL image, a file path or an array, got {type(image).__name__}")


def flatten_images(images: Any) -> list[Any]:
    if isinstance(images, list | tuple):
        flat: list[Any] = []
        for item in images:  # one level of per-sample nesting, as transformers accepts
            flat.extend(item if isinstance(item, list | tuple) else [item])
        return flat
    return [images]
