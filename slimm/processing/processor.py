"""The `Processor`: chat template, tokenizer and pixel preprocessing together, turning text,
images and videos into the model's inputs (left-padded ids, mask, pixel rows and grids).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slimm.config import QWEN2_SPECIAL_TOKENS, PreprocessorConfig, check_pixel_bounds, read_json
from slimm.errors import CheckpointError, InputError
from slimm.host.arrays import as_numpy, is_torch_tensor
from slimm.processing.chat_template import QWEN2_VL_CHAT_TEMPLATE, apply_chat_template, load_chat_template
from slimm.processing.patches import ImageProcessor
from slimm.processing.placeholders import expand_vision_placeholders
from slimm.processing.tokenizer import Tokenizer, clean_up_tokenization, id_list

DEFAULT_PAD_TOKEN_ID = 151643  # <|endoftext|>


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
        *,
        exif_transpose: bool = True,
    ) -> Processor:
        """Read tokenizer, preprocessor settings, chat template and token ids from a checkpoint.

        `exif_transpose`: turn images upright by their EXIF orientation (see ImageProcessor)."""
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
            ImageProcessor(pcfg, exif_transpose=exif_transpose),
            load_chat_template(ckpt_dir),
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
        if is_torch_tensor(sequences):
            sequences = as_numpy(sequences)
        texts = [tok.decode(id_list(s), skip_special_tokens=skip_special_tokens) for s in sequences]
        if kwargs.get("clean_up_tokenization_spaces"):
            texts = [clean_up_tokenization(t) for t in texts]
        return texts

    def decode(self, ids: Any, skip_special_tokens: bool = True, **kwargs: Any) -> str:
        return self.batch_decode([id_list(ids)], skip_special_tokens=skip_special_tokens, **kwargs)[0]
