"""Running the six exported parts: the host-side orchestration every non-torch backend shares.

A backend built on the parts only says how to run one part (`run_part`); this class does the rest
in NumPy: vision bookkeeping, fusion order, position ids, the KV pool of fixed-size rows (one per slot).
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

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int8": np.int8}


class PartsBackend(Backend):
    """The backend steps over parts A-F. Subclasses implement `run_part` (and may keep the pool's
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
        self.kv_dtype = NP_DTYPES[self.specs["F"]["past_key.0"].dtype]  # int8: a fused F's int8 cache
        # a fused F (GroupQueryAttention) places the current tokens inside the past buffer it is given,
        # so the slice it reads must hold them too; the exported F appends them to it
        self.current_in_past = "GroupQueryAttention" in parts["F"].contrib_ops

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

    # ---- the KV pool: fixed-size buffers, a row per slot, only new entries written ---------------------
    def new_cache(self, n: int, capacity: int) -> None:
        t = self.config.text
        shape = (n, t.num_key_value_heads, capacity, t.head_dim)
        self.keys = [np.zeros(shape, self.kv_dtype) for _ in range(t.num_hidden_layers)]
        self.values = [np.zeros(shape, self.kv_dtype) for _ in range(t.num_hidden_layers)]
        self.past_mask = np.zeros((n, capacity), np.int64)

    def write_cache(
        self,
        presents: list[Any],
        src: np.ndarray,
        rows: np.ndarray,
        offsets: np.ndarray,
        cur_mask: np.ndarray,
    ) -> None:
        """F's new entries of batch rows `src` (k,) into pool rows `rows` (k,), each from its own
        offset; cur_mask (F batch, S)."""
        n = self.config.text.num_hidden_layers
        S = cur_mask.shape[1]
        idx = offsets[:, None] + np.arange(S)  # (k, S) positions written in each row
        for buf, new in zip(self.keys + self.values, presents[: 2 * n], strict=True):
            # rows[:, None] and idx index together, around the head axis: the target is (k, S, KV, D)
            buf[rows[:, None], :, idx] = self.to_numpy(new)[src].transpose(0, 2, 1, 3)
        self.past_mask[rows[:, None], idx] = cur_mask[src]

    def cache_feeds(self, lo: int, hi: int, length: int | None = None) -> dict[str, Any]:
        """Pool rows lo..hi-1, their first `length` positions (default: all), as F's past inputs.
        Whole rows are views of the pool; fewer positions are a copy of just those (ONNX Runtime takes
        contiguous arrays), far less than F reading every row's full capacity each step."""
        n = self.config.text.num_hidden_layers
        length = self.past_mask.shape[1] if length is None else length

        def rows(buf):  # a contiguous slice (whole rows) comes back as it is, not copied
            return np.ascontiguousarray(buf[lo:hi, :, :length])

        feeds = {f"past_key.{i}": rows(self.keys[i]) for i in range(n)}
        feeds.update({f"past_value.{i}": rows(self.values[i]) for i in range(n)})
        feeds["past_mask"] = np.ascontiguousarray(self.past_mask[lo:hi, :length])
        return feeds

    def past_length(self, needed: int) -> int:
        """Positions of the pool a step reads when its rows hold at most `needed` entries: a power of
        two from 64 (a few shapes), or the whole capacity (no copy) where that is at most twice as
        much. A serving pool gives every slot the export's whole maximum sequence length; reading all
        of it for every row, every step, made a step's cost grow with the batch as if every row were
        full."""
        cap = self.past_mask.shape[1]
        length = max(64, 1 << max(needed - 1, 0).bit_length())
        return cap if 2 * length > cap else length

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

    def prefill_rows(self, first, inputs):
        cfg = self.config
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        B, S = ids.shape
        embeds = self.to_numpy(self.run("A", {"input_ids": ids})[0])
        pos_all, slices_all = [], []
        for pix, grid, token, what in (
            ("pixel_values", "image_grid_thw", cfg.image_token_id, "image"),
            ("pixel_values_videos", "video_grid_thw", cfg.video_token_id, "video"),
        ):
            if pix not in inputs:
                continue
            if self.visual_cache is None:
                tokens, slices = self.encode_visual(inputs[pix], inputs[grid])
            else:
                tokens, slices = self.visual_cache.encode(inputs[pix], inputs[grid], self.encode_visual)
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
        position_ids, deltas = model_rope_index(
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
        self.past_mask[first : first + B] = 0  # what the rows held before is not attended to
        rows = np.arange(B)
        offsets = np.zeros(B, np.int64)
        logits = self.step(embeds, cos, sin, mask, ds, first, first + B, rows, rows + first, offsets)
        return logits, np.asarray(deltas, np.int64).reshape(-1)

    def step(
        self,
        embeds,
        cos,
        sin,
        cur_mask: np.ndarray,
        deepstack: dict,
        lo: int,
        hi: int,
        src: np.ndarray,
        rows: np.ndarray,
        offsets: np.ndarray,
    ) -> np.ndarray:
        """F over pool rows lo..hi-1; the new entries of batch rows `src` are kept (in pool `rows` at
        `offsets`); logits (k, V) of those batch rows."""
        feeds = {"inputs_embeds": embeds, "cos": cos, "sin": sin, "cur_mask": cur_mask}
        feeds.update(deepstack)
        needed = 0 if offsets.size == 0 else int(offsets.max())
        if self.current_in_past:
            needed += cur_mask.shape[1]
        feeds.update(self.cache_feeds(lo, hi, self.past_length(needed)))
        out = self.run("F", feeds)
        self.write_cache(out[2:], src, rows, offsets, cur_mask)
        return self.to_numpy(out[0])[src].astype(np.float32, copy=False)

    def decode_rows(self, slots, tokens):
        # F runs over rows 0..max(slots) (a view of the pool, every row at its own length through
        # past_mask and its position); rows not asked for get a pad token, and their outputs are dropped
        s = self.slots
        hi = int(slots.max()) + 1
        tok = np.full((hi, 1), self.config.pad_token_id, np.int64)
        tok[slots, 0] = tokens
        embeds = self.to_numpy(self.run("A", {"input_ids": tok})[0])
        pos = (s.deltas[:hi] + s.lengths[:hi]).astype(np.int64)[:, None]  # (hi, 1)
        cos, sin = self.run("E", {"position_ids": pos})
        ones = np.ones_like(tok)
        return self.step(
            embeds, cos, sin, ones, self.empty_deepstack(), 0, hi, slots, slots, s.lengths[slots]
        )
