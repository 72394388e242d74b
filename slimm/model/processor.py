"""The original's processor import path, `slimm.model.processor.SliMMQwen2VLProcessor`.

A thin layer over `slimm.processing.Processor` that answers in the transformers style: a dict
with attribute access, torch tensors when asked, and `.to(device)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slimm.config import read_json
from slimm.errors import InputError
from slimm.hub import resolve_model
from slimm.processing import ImageProcessor, Processor, Tokenizer
from slimm.processing.messages import ORIGINAL_EXIF_TRANSPOSE


class BatchFeature(dict):
    """Model inputs by name; `inputs.input_ids` reads `inputs["input_ids"]`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any = None, dtype: Any = None) -> BatchFeature:
        """Move torch tensors to `device`; `dtype` applies to floating tensors only (pixel values)."""
        import torch

        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                cast = dtype if dtype is not None and value.is_floating_point() else None
                self[key] = value.to(device=device, dtype=cast)
        return self


def _convert(data: dict[str, np.ndarray], return_tensors: str | None) -> BatchFeature:
    if return_tensors in (None, "np"):
        return BatchFeature(data)
    if return_tensors != "pt":
        raise InputError(f"return_tensors={return_tensors!r} is not supported; use 'pt', 'np' or None")
    import torch

    return BatchFeature({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in data.items()})


class SliMMQwen2VLProcessor:
    """Chat template + tokenizer + Qwen2-VL image processor, called like the original."""

    def __init__(self, processor: Processor, deepstack_type: str | None = None):
        self.processor = processor
        self.deepstack_type = deepstack_type  # kept for compatibility; the original does not use it either

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, **kwargs: Any
    ) -> SliMMQwen2VLProcessor:
        """Load from a local checkpoint directory or a hub id; `min_pixels` / `max_pixels` override the
        image bounds."""
        pretrained_model_name_or_path = resolve_model(pretrained_model_name_or_path)
        processor = Processor.from_pretrained(
            pretrained_model_name_or_path,
            tokenizer_dir=kwargs.get("tokenizer_dir"),
            min_pixels=kwargs.get("min_pixels"),
            max_pixels=kwargs.get("max_pixels"),
            # the original's transformers processor takes the images process_vision_info opened as
            # they are: no EXIF orientation applied (see ORIGINAL_EXIF_TRANSPOSE)
            exif_transpose=ORIGINAL_EXIF_TRANSPOSE,
        )
        deepstack_type = kwargs.get("deepstack_type")
        if deepstack_type is None:
            extra = read_json(Path(pretrained_model_name_or_path) / "processor_config.json", required=False)
            deepstack_type = extra.get("deepstack_type")
        return cls(processor, deepstack_type=deepstack_type)

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.processor.tokenizer

    @property
    def image_processor(self) -> ImageProcessor:
        return self.processor.image_processor

    @property
    def chat_template(self) -> str:
        return self.processor.chat_template

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]] | list[list[dict[str, Any]]],
        tokenize: bool = False,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str | list[str] | list[int] | list[list[int]]:
        return self.processor.apply_chat_template(
            conversation, tokenize=tokenize, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        videos: Any = None,
        padding: bool = True,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        data = self.processor(text=text, images=images, videos=videos, padding=bool(padding))
        return _convert(data, return_tensors)

    def batch_decode(
        self,
        sequences: Any,
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        return self.processor.batch_decode(
            sequences,
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
        )

    def decode(
        self,
        ids: Any,
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> str:
        return self.processor.decode(
            ids,
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
        )
