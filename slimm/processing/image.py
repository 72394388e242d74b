"""One image to RGB pixels, and the Qwen2-VL sizing rule: opening files and data URIs, NumPy /
torch arrays to H x W x 3 uint8, and `smart_resize` (the target size of every image and frame).
"""

from __future__ import annotations

import base64
import binascii
import math
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from slimm.errors import InputError
from slimm.host.arrays import is_torch_tensor

MAX_ASPECT_RATIO = 200  # beyond this smart_resize cannot keep both sides >= one patch window
ROUNDINGS = ("transformers", "qwen-vl-utils")  # see smart_resize


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
    *,
    rounding: str = "transformers",
) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    `rounding="transformers"`: the arithmetic of transformers' Qwen2-VL image processor, including
    Python's round (halves go to even), which decides many real sizes.
    `rounding="qwen-vl-utils"`: the original SliMM's copy of qwen-vl-utils (`process_vision_info`):
    each side is first rounded and then raised to at least `factor`, and a shrink under max_pixels is
    not raised back to `factor`. The two differ only for sides under factor/2 and for a max_pixels
    below factor**2 (an error here, where the original would resize to zero rows).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding {rounding!r} is not one of {', '.join(ROUNDINGS)}")
    if height <= 0 or width <= 0:
        raise InputError(f"image of size {width}x{height} (width x height) has no pixels")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        # qwen-vl-utils skips this check and fails later inside the vision tower; say it here instead
        raise InputError(
            f"image of size {width}x{height} (width x height) has aspect ratio {ratio:.1f}; "
            f"at most {MAX_ASPECT_RATIO} is supported: crop or pad it first"
        )
    original = rounding == "qwen-vl-utils"
    least_rounded = factor if original else 0  # qwen-vl-utils raises each rounded side to `factor`
    least_shrunk = 0 if original else factor  # ... but not a shrunk one: that one may reach zero
    h_bar = max(least_rounded, round(height / factor) * factor)
    w_bar = max(least_rounded, round(width / factor) * factor)
    shrunk = h_bar * w_bar > max_pixels
    if shrunk:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(least_shrunk, math.floor(height / beta / factor) * factor)
        w_bar = max(least_shrunk, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar <= 0 or w_bar <= 0:
        raise InputError(
            f"image of size {width}x{height} resizes to {w_bar}x{h_bar} with factor {factor}, "
            f"min_pixels {min_pixels}, max_pixels {max_pixels}: raise {'max_pixels' if shrunk else 'min_pixels'}"
        )
    return h_bar, w_bar


def no_network(source: str, what: str) -> InputError:
    return InputError(
        f"{what} {source}: http(s) URLs are not fetched (this package does no network access); "
        "download the file first and pass its local path"
    )


def _open_image(source: Any, what: str) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, bytes | bytearray | memoryview):
        name, stream = "(image bytes)", BytesIO(source)
    elif isinstance(source, str | Path):
        text = str(source)
        if text.startswith(("http://", "https://")):
            raise no_network(text, what)
        if text.startswith("data:image"):
            if "base64," not in text:
                raise InputError(f"{what} {text[:40]}...: only base64 data URIs are supported")
            try:
                data = base64.b64decode(text.split("base64,", 1)[1], validate=False)
            except (binascii.Error, ValueError) as e:
                raise InputError(f"{what} {text[:40]}...: bad base64 data ({e})") from None
            name, stream = "(base64 data URI)", BytesIO(data)
        else:
            name = text[7:] if text.startswith("file://") else text
            stream = name
    else:
        raise InputError(
            f"{what}: expected a local path, file:// URI, data:image base64 URI, the file's bytes or a "
            f"PIL image, got {type(source).__name__}"
        )
    try:
        return Image.open(stream)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{what} {name}: cannot read it as an image ({e})") from None


def load_image(source: Any, what: str = "image", *, exif_transpose: bool = True) -> Image.Image:
    """One image as an RGB PIL image, from a PIL image, a local path, a file:// or data:image URI or
    the file's bytes. `exif_transpose` turns it upright by its EXIF orientation."""
    opened = _open_image(source, what)
    try:
        image = ImageOps.exif_transpose(opened) if exif_transpose else opened
        # convert("RGB") drops alpha rather than blending it, as the original pipeline did; it also
        # forces the decode, so a damaged file fails here
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{what} {describe(opened)[:200]}: cannot decode it ({e})") from None
    finally:
        if opened is not source:
            opened.close()


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


def load_rgb(image: Any, what: str = "image", *, exif_transpose: bool = True) -> np.ndarray:
    """One image (PIL, path, URI, bytes, HWC/HW numpy array, CHW torch tensor) as H x W x 3 uint8."""
    if isinstance(image, str | Path | bytes | bytearray | memoryview | Image.Image):
        return np.asarray(load_image(image, what, exif_transpose=exif_transpose))
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


def as_image_list(images: Any) -> list[Any]:
    """`images` as given to prepare / stream: None, one image (a path, PIL image, array) or a list."""
    if images is None:
        return []
    return list(images) if isinstance(images, list | tuple) else [images]
