"""The PyTorch model on the shared generation loop: the backend's cache steps (a KV pool with a row
per slot, prefill into rows, decode of some rows each at its own length) behind the `Backend`
interface. `model.generate` and the torch backend both run through it.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from slimm.backends.base import Backend
from slimm.model.language import KVCache


class ModelRunner(Backend):
    """The cache steps of a loaded `SliMMForConditionalGeneration` (taken by interface, so that the
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
        return None if x is None else torch.from_numpy(np.ascontiguousarray(x)).to(self.model.device)

    def new_cache(self, n, capacity):
        m = self.model
        self.cache = KVCache(m.config.text, n, capacity, m.dtype, m.device)

    @torch.no_grad()
    def prefill_rows(self, first, inputs):
        m = self.model
        ids = self._t(inputs["input_ids"])
        B = ids.shape[0]
        # the model's prefill fills a KVCache from position 0: hand it one over these rows (views of
        # the pool's buffers, so its in-place writes land in the pool)
        rows = copy.copy(self.cache)
        rows.keys = [k[first : first + B] for k in self.cache.keys]
        rows.values = [v[first : first + B] for v in self.cache.values]
        rows.mask = self.cache.mask[first : first + B]
        rows.mask.zero_()  # what the rows held before is not attended to
        rows.length = 0
        logits, deltas = m.prefill(
            ids,
            self._t(inputs["attention_mask"]),
            rows,
            self._t(inputs.get("pixel_values")),
            inputs.get("image_grid_thw"),
            self._t(inputs.get("pixel_values_videos")),
            inputs.get("video_grid_thw"),
            encode_visual=None if self.visual_cache is None else self._cached_visual,
        )
        return logits.cpu().numpy(), deltas.cpu().numpy().astype(np.int64).reshape(-1)

    def _cached_visual(self, pixels, grid):
        return self.visual_cache.encode(pixels, grid, self.model.visual.encode)

    @torch.no_grad()
    def decode_rows(self, slots, tokens):
        # the decoder runs over rows 0..max(slots) (views of the pool, every row at its own length
        # through its mask and position); rows not asked for get a pad token, their outputs dropped
        m, c, s = self.model, self.cache, self.slots
        hi = int(slots.max()) + 1
        tok = np.full(hi, self.config.pad_token_id, np.int64)
        tok[slots] = tokens
        h = m.model.embed_tokens(self._t(tok)[:, None])  # (hi, 1, d)
        pos = self._t(s.deltas[:hi] + s.lengths[:hi]).view(1, hi, 1).expand(3, hi, 1)  # (3, hi, 1)
        cos, sin = m.model.rope(pos, h.dtype)
        cur_mask = torch.ones((hi, 1), dtype=torch.int64, device=m.device)
        keys, values = [k[:hi] for k in c.keys], [v[:hi] for v in c.values]
        hidden, new_k, new_v = m.model(h, cos, sin, keys, values, c.mask[:hi], cur_mask)
        rows, at = self._t(slots), self._t(s.lengths[slots])
        for buf, new in zip(c.keys + c.values, new_k + new_v, strict=True):
            buf[rows, :, at] = new[rows, :, 0]  # (k, KV, D): each row at its own length
        c.mask[rows, at] = 1
        return m.logits(hidden[rows, -1]).cpu().numpy()
