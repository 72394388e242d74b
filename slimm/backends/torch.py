"""PyTorch backend: the project's own model code on a checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slimm.backends.base import Backend
from slimm.errors import InputError
from slimm.model.language import KVCache
from slimm.model.slimm import DTYPES, SliMMForConditionalGeneration


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model: SliMMForConditionalGeneration, processor=None) -> None:
        super().__init__(model.config, processor)
        self.model = model
        self.cache: KVCache | None = None

    @classmethod
    def load(cls, path, dtype: str = "float32", device: str = "cpu", **kwargs) -> TorchBackend:
        from slimm.processing import Processor

        if device == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda was asked for, but torch sees no CUDA device here")
        if dtype not in DTYPES:
            raise InputError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        model = SliMMForConditionalGeneration.from_pretrained(path, torch_dtype=dtype, device_map=device)
        has_tokenizer = (Path(path) / "tokenizer.json").exists()
        return cls(model, Processor.from_pretrained(path) if has_tokenizer else None)

    @classmethod
    def from_model(cls, model: SliMMForConditionalGeneration) -> TorchBackend:
        return cls(model)

    def _t(self, x: np.ndarray | None) -> torch.Tensor | None:
        return None if x is None else torch.from_numpy(x).to(self.model.device)

    @torch.no_grad()
    def prefill(self, inputs, capacity):
        m = self.model
        ids = self._t(inputs["input_ids"])
        self.cache = KVCache(m.config.text, ids.shape[0], capacity, m.dtype, m.device)
        logits, self.rope_deltas = m.prefill(
            ids,
            self._t(inputs["attention_mask"]),
            self.cache,
            self._t(inputs.get("pixel_values")),
            inputs.get("image_grid_thw"),
            self._t(inputs.get("pixel_values_videos")),
            inputs.get("video_grid_thw"),
        )
        return logits.cpu().numpy()

    @torch.no_grad()
    def decode(self, tokens):
        if self.cache is None:
            raise InputError("decode() before prefill()")
        if self.cache.length >= self.cache.capacity:
            raise InputError(f"the KV cache is full ({self.cache.capacity} positions)")
        logits = self.model.decode_step(self._t(tokens), self.rope_deltas, self.cache)
        return logits.cpu().numpy()
