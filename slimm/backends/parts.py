"""Running the six exported parts: the host-side orchestration every non-torch backend shares.

A backend built on the parts only says how to run one part (`run_part`); this class does the rest
in NumPy: vision bookkeeping, fusion order, position ids, the fixed-size KV cache buffers.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import numpy as np

from slimm.backends.base import Backend
from slimm.errors import InputError
from slimm.export.manifest import Manifest
from slimm.host.positions import model_rope_index
from slimm.host.vision_index import vision_host_inputs

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


class PartsBackend(Backend):
    """prefill/decode over parts A-F. Subclasses implement `run_part` (and may keep the cache
    buffers on the framework's side by overriding `new_cache` / `write_cache` / `cache_feeds`)."""

    def __init__(self, export_dir: str | Path, manifest: Manifest | None = None) -> None:
        from slimm.processing import Processor

        self.export_dir = Path(export_dir)
        self.manifest = manifest or Manifest.read(self.export_dir)
        has_tok = (self.export_dir / "tokenizer.json").exists()
        super().__init__(
            self.manifest.config, Processor.from_pretrained(self.export_dir) if has_tok else None
        )
        self.max_seq_len = self.manifest.max_seq_len
        parts = self.manifest.parts
        self.specs = {p: {t.name: t for t in parts[p].inputs} for p in parts}
        self.out_names = {p: [t.name for t in parts[p].outputs] for p in parts}
        self.float = NP_DTYPES[self.specs["F"]["inputs_embeds"].dtype]
        self.length = 0

    @abc.abstractmethod
    def run_part(self, part: str, feeds: dict[str, np.ndarray]) -> list[Any]:
        """Run one part; outputs in manifest order (NumPy or the framework's own arrays)."""

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def check_feeds(self, part: str, feeds: dict[str, np.ndarray]) -> None:
        """Names, ranks and dtypes against the manifest: a clear error naming part and input."""
        spec = self.specs[part]
        if set(feeds) != set(spec):
            raise InputError(
                f"part {part}: inputs {sorted(feeds)} do not match the manifest's {sorted(spec)}"
            )
        for name, arr in feeds.items():
            if not isinstance(arr, np.ndarray):
                continue  # a tensor one of our own parts produced: already the declared kind
            want = spec[name]
            if arr.ndim != len(want.dims) or arr.dtype != NP_DTYPES[want.dtype]:
                raise InputError(
                    f"part {part}: input {name!r} is {arr.dtype} of shape {tuple(arr.shape)}; "
                    f"expected {want.dtype} with dims {want.dims}"
                )

    def run(self, part: str, feeds: dict[str, np.ndarray]) -> list[Any]:
        self.check_feeds(part, feeds)
        return self.run_part(part, feeds)

    # ---- the KV cache: fixed-size buffers, only new entries written ------------------------------------
    def new_cache(self, batch: int, capacity: int) -> None:
        t = self.config.text
        shape = (batch, t.num_key_value_heads, capacity, t.head_dim)
        self.keys = [np.zeros(shape, self.float) for _ in range(t.num_hidden_layers)]
        self.values = [np.zeros(shape, self.float) for _ in range(t.num_hidden_layers)]
        self.past_mask = np.zeros((batch, capacity), np.int64)
        self.capacity = capacity
        self.length = 0

    def write_cache(self, presents: list[Any], cur_mask: np.ndarray) -> None:
        n = self.config.text.num_hidden_layers
        end = self.length + cur_mask.shape[1]
        for buf, new in zip(self.keys + self.values, presents[: 2 * n], strict=True):
            buf[:, :, self.length : end] = self.to_numpy(new)
        self.past_mask[:, self.length : end] = cur_mask
        self.length = end

    def cache_feeds(self) -> dict[str, Any]:
        n = self.config.text.num_hidden_layers
        feeds = {f"past_key.{i}": self.keys[i] for i in range(n)}
        feeds.update({f"past_value.{i}": self.values[i] for i in range(n)})
        feeds["past_mask"] = self.past_mask
        return feeds

    # ---- prefill and decode -----------------------------------------------------------------------------
    def encode_visual(self, pixels: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """B once per image / video: attention never crosses an image, so nothing changes, and the
        block-diagonal mask stays the size of one image."""
        cfg = self.config
        tokens, slices, start = [], [], 0
        for g in grid:
            rows = int(np.prod(g))
            if start + rows > pixels.shape[0]:
                raise InputError(f"pixel rows ({pixels.shape[0]}) run out before grid {grid.tolist()} does")
            host = vision_host_inputs(cfg.deepstack_type, cfg.spatial_merge_size, g[None])
            out = self.run("B", {"pixel_values": pixels[start : start + rows], **host})
            tokens.append(self.to_numpy(out[0]))
            if cfg.use_deepstack:
                slices.append(self.to_numpy(out[1]))
            start += rows
        if start != pixels.shape[0]:
            raise InputError(
                f"pixel_values has {pixels.shape[0]} rows but grid_thw {grid.tolist()} describes {start}"
            )
        return np.concatenate(tokens), (np.concatenate(slices, axis=1) if slices else None)

    def empty_deepstack(self) -> dict[str, np.ndarray]:
        if not self.config.use_deepstack:
            return {}
        # no visual tokens: one zero slice added at position 0 is an exact no-op, and keeps every
        # size >= 1 (jax.export's symbolic sizes and some static-graph kernels reject empty tensors)
        d = self.config.text.hidden_size
        return {
            "deepstack": np.zeros((self.config.num_deepstack, 1, d), self.float),
            "visual_pos": np.zeros((1,), np.int64),
        }

    def prefill(self, inputs, capacity):
        cfg = self.config
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        B, S = ids.shape
        if capacity > self.max_seq_len:
            raise InputError(
                f"{S} prompt tokens + new tokens need {capacity} cache positions; this export's maximum "
                f"sequence length is {self.max_seq_len} (re-export with a larger --max-seq-len)"
            )
        embeds = self.to_numpy(self.run("A", {"input_ids": ids})[0])
        pos_all, slices_all = [], []
        for pix, grid, token, what in (
            ("pixel_values", "image_grid_thw", cfg.image_token_id, "image"),
            ("pixel_values_videos", "video_grid_thw", cfg.video_token_id, "video"),
        ):
            if pix not in inputs:
                continue
            tokens, slices = self.encode_visual(inputs[pix], inputs[grid])
            pos = np.flatnonzero(ids.reshape(-1) == token).astype(np.int64)
            if pos.size != tokens.shape[0]:
                raise InputError(
                    f"the prompt holds {pos.size} {what} tokens but the {what}s give {tokens.shape[0]} "
                    f"(grid_thw {inputs[grid].tolist()}); expand each <|{what}_pad|> to match"
                )
            embeds = self.to_numpy(
                self.run(
                    "C",
                    {"inputs_embeds": embeds, "visual_embeds": tokens.astype(self.float), "visual_pos": pos},
                )[0]
            )
            pos_all.append(pos)
            if slices is not None:
                slices_all.append(slices)
        position_ids, self.rope_deltas = model_rope_index(
            cfg, ids, inputs.get("image_grid_thw"), inputs.get("video_grid_thw"), mask
        )
        if pos_all:
            cos, sin = self.run("D", {"position_ids": position_ids})
        else:
            cos, sin = self.run("E", {"position_ids": np.ascontiguousarray(position_ids[0])})
        ds = self.empty_deepstack()
        if slices_all:
            pos = np.concatenate(pos_all)
            order = np.argsort(pos, kind="stable")  # slices of all visual inputs in prompt order
            ds = {
                "deepstack": np.concatenate(slices_all, axis=1)[:, order].astype(self.float),
                "visual_pos": pos[order],
            }
        self.new_cache(B, capacity)
        return self.step(embeds, cos, sin, mask, ds)

    def step(self, embeds, cos, sin, cur_mask: np.ndarray, deepstack: dict) -> np.ndarray:
        feeds = {
            "inputs_embeds": embeds,
            "cos": cos,
            "sin": sin,
            "cur_mask": cur_mask,
            **deepstack,
            **self.cache_feeds(),
        }
        out = self.run("F", feeds)
        self.write_cache(out[2:], cur_mask)
        return self.to_numpy(out[0]).astype(np.float32, copy=False)

    def decode(self, tokens):
        if self.length == 0:
            raise InputError("decode() before prefill()")
        if self.length >= self.capacity:
            raise InputError(f"the KV cache is full ({self.capacity} positions)")
        tok = tokens.astype(np.int64)[:, None]
        embeds = self.to_numpy(self.run("A", {"input_ids": tok})[0])
        pos = (self.rope_deltas + self.length).astype(np.int64)  # (B, 1)
        cos, sin = self.run("E", {"position_ids": pos})
        return self.step(embeds, cos, sin, np.ones_like(tok), self.empty_deepstack())
