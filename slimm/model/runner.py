"""The PyTorch model on the shared generation loop: prefill and decode steps over its KV cache,
behind the `Backend` interface. `model.generate` and the torch backend both run through it.
"""

from __future__ import annotations

import numpy as np
import torch

from slimm.backends.base import Backend
from slimm.errors import InputError
from slimm.model.language import KVCache


class ModelRunner(Backend):
    """prefill / decode of a loaded `SliMMForConditionalGeneration` (taken by interface, so that the
    model module can use this class without an import circle)."""

    name = "torch"

    def __init__(self, model, processor=None) -> None:
        super().__init__(model.config, processor)
        self.model = model
        self.cache: KVCache | None = None

    @classmethod
    def load(cls, path, **kwargs) -> ModelRunner:
        raise NotImplementedError("load a model directory with slimm.load(path, backend='torch')")

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
