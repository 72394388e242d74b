"""The one backend interface: per-slot prefill and decode over a pool of KV cache rows turn token ids
into logits; `prefill` / `decode` (one batch), `generate`, `stream` and the transformers-style keyword
API are built on them through slimm.generate, and the server's engine drives the slots directly.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from slimm import frameworks
from slimm.config import SliMMConfig
from slimm.errors import InputError
from slimm.generate import (
    GenerateOutput,
    GenerationConfig,
    check_generation_settings,
    generate,
    stream_generate,
)
from slimm.processing import as_image_list, as_video_list

INPUT_NAMES = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
)


def normalize_inputs(inputs: dict[str, Any], config: SliMMConfig | None = None) -> dict[str, np.ndarray]:
    """Model inputs as NumPy arrays with checked ranks and dtypes, and, given the model's config,
    checked against it: the one validation every backend shares, so that a bad input is the same
    InputError on all of them before any framework sees it."""
    unknown = set(inputs) - set(INPUT_NAMES)
    if unknown:
        raise InputError(
            f"unknown model inputs: {', '.join(sorted(unknown))}; expected some of {', '.join(INPUT_NAMES)}"
        )
    if inputs.get("input_ids") is None:
        raise InputError("input_ids is required")
    out = {k: frameworks.to_numpy(v) for k, v in inputs.items() if v is not None}
    ids = out["input_ids"]
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[1] == 0:
        raise InputError(
            f"input_ids must be integer token ids of shape (batch, seq), got {ids.dtype} {ids.shape}"
        )
    out["input_ids"] = ids.astype(np.int64)
    mask = out.get("attention_mask")
    if mask is None:
        mask = np.ones_like(out["input_ids"])
    mask = mask.reshape(ids.shape) if mask.size == ids.size else mask
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
    if not (mask.dtype.kind in "biuf" and np.isin(mask, (0, 1)).all()):
        raise InputError(f"attention_mask must hold 0 and 1 only, got values {np.unique(mask)[:8].tolist()}")
    empty = np.flatnonzero(~mask.astype(bool).any(1))
    if empty.size:
        raise InputError(
            f"attention_mask row(s) {empty.tolist()} are all 0: a sequence needs a token to attend to"
        )
    out["attention_mask"] = mask.astype(np.int64)
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if pix in out and grid not in out:
            raise InputError(f"{pix} given without {grid}")
        if grid in out and pix not in out:
            raise InputError(f"{grid} given without {pix}")
        if pix in out:
            out[pix], out[grid] = _check_visual(pix, out[pix], grid, out[grid])
    if config is not None:
        check_against_config(out, config)
    return out


def _check_visual(pix: str, pixels: np.ndarray, grid_name: str, grid: np.ndarray):
    if grid.dtype.kind not in "iu" or grid.size == 0 or grid.size % 3 or grid.ndim > 2:
        raise InputError(
            f"{grid_name} must be integer (t, h, w) rows, one per image/video, got {grid.dtype} {grid.shape}"
        )
    grid = grid.astype(np.int64).reshape(-1, 3)
    if (grid <= 0).any():
        raise InputError(f"{grid_name} {grid.tolist()} has a zero or negative size")
    if pixels.ndim != 2 or pixels.dtype.kind not in "biuf":
        raise InputError(
            f"{pix} must be real patch rows of shape (rows, width), got {pixels.dtype} {pixels.shape}"
        )
    rows = int(grid.prod(1).sum())
    if pixels.shape[0] != rows:
        raise InputError(
            f"{pix} has {pixels.shape[0]} patch rows but {grid_name} {grid.tolist()} describes {rows}"
        )
    pixels = pixels.astype(np.float32, copy=False)
    if not np.isfinite(pixels).all():
        raise InputError(f"{pix} holds NaN or infinite values")
    return pixels, grid


def check_against_config(inputs: dict[str, np.ndarray], cfg: SliMMConfig) -> None:
    """Token ids inside the vocabulary; patch rows as wide as the vision tower takes; grids the
    merger can group; one placeholder token per merged patch."""
    ids = inputs["input_ids"]
    vocab = cfg.text.vocab_size
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = ids[(ids < 0) | (ids >= vocab)]
        raise InputError(
            f"input_ids hold {bad[:4].tolist()}: token ids must be in 0..{vocab - 1} (vocabulary size)"
        )
    v, merge = cfg.vision, cfg.spatial_merge_size
    patch = v.patch_size * (2 if cfg.deepstack_type == "efficient" else 1)  # Efficient: 2x2 tower patches
    width = v.in_channels * v.temporal_patch_size * patch * patch
    for pix, grid_name, token, what in (
        ("pixel_values", "image_grid_thw", cfg.image_token_id, "image"),
        ("pixel_values_videos", "video_grid_thw", cfg.video_token_id, "video"),
    ):
        n_tokens = int((ids == token).sum())
        if pix not in inputs:
            if n_tokens:
                raise InputError(
                    f"the prompt holds {n_tokens} <|{what}_pad|> tokens but no {what}s were given ({pix})"
                )
            continue
        pixels, grid = inputs[pix], inputs[grid_name]
        if pixels.shape[1] != width:
            raise InputError(
                f"{pix} rows have {pixels.shape[1]} values; this model takes {width} "
                f"(C={v.in_channels} x T={v.temporal_patch_size} x {patch}x{patch} patches)"
            )
        if (grid[:, 1:] % merge).any():
            raise InputError(
                f"{grid_name} {grid.tolist()}: heights and widths must be multiples of {merge} "
                "(the merger groups that many patches per side)"
            )
        want = int(grid.prod(1).sum()) // (merge * merge)
        if n_tokens != want:
            raise InputError(
                f"the prompt holds {n_tokens} <|{what}_pad|> tokens but the {what}s give {want} "
                f"({grid_name} {grid.tolist()}); expand each <|{what}_pad|> to match"
            )


@dataclass
class Slots:
    """What the host knows of an open KV pool: one cache row per slot, each at its own length."""

    capacity: int  # positions per row: a slot's prompt + answer
    lengths: np.ndarray  # (n,) int64 positions filled (left padding included)
    deltas: np.ndarray  # (n,) int64 M-RoPE delta: a decode position is delta + length
    used: np.ndarray  # (n,) bool

    @property
    def n(self) -> int:
        return len(self.used)


def chat_inputs(
    processor, prompt: str, images=(), videos=(), system: str | None = None
) -> dict[str, np.ndarray]:
    """One chat turn -> model inputs through a Processor and its chat template: what `prepare` runs,
    and what `slimm batch` runs in its read stage, where no model is loaded."""
    images, videos = as_image_list(images), as_video_list(videos)  # one path is one image
    content = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
    content.append({"type": "text", "text": prompt})
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content})
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[text], images=images or None, videos=videos or None)


class Backend(abc.ABC):
    """A loaded model in one framework. Subclasses implement `load` and three cache steps:
    `new_cache` (a pool of rows), `prefill_rows` (prompts into rows) and `decode_rows` (one token for
    some rows, each at its own length); the slot API and the batch API are built on them here."""

    name: ClassVar[str]

    def __init__(self, config: SliMMConfig, processor=None) -> None:
        self.config = config
        self.processor = processor  # slimm.processing.Processor, or None without tokenizer files
        # held while the KV pool is in use: the pool and its lengths live on the object, so calls
        # from several threads take turns (generate and stream take it for one answer; the server's
        # engine while it has requests running; code driving the steps itself takes it too)
        self.lock = threading.Lock()
        self.slots: Slots | None = None
        # vision-encoder outputs by image content (slimm.serve.visual_cache), set by the server: prefill
        # then encodes only the images it has not seen
        self.visual_cache = None

    @classmethod
    @abc.abstractmethod
    def load(cls, path, **kwargs) -> Backend: ...

    @abc.abstractmethod
    def new_cache(self, n: int, capacity: int) -> None:
        """Allocate the KV pool: `n` rows of `capacity` positions (what was there before is dropped)."""

    @abc.abstractmethod
    def prefill_rows(self, first: int, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Run a (B, S) prompt batch into pool rows first..first+B-1 from position 0 (their old
        entries no longer attended to); returns last-position logits (B, V) float32 and the M-RoPE
        deltas (B,)."""

    @abc.abstractmethod
    def decode_rows(self, slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Append tokens (k,) to the rows `slots` (k,), each at its own `self.slots.lengths`;
        logits (k, V) float32. Other rows are left as they are."""

    # ---- slots: the continuous-batching interface ------------------------------------------------------
    def open_slots(self, n: int, capacity: int) -> None:
        """A KV pool of `n` slots of `capacity` positions each (prompt + answer); all free."""
        from slimm.generate import position_limit

        if not (isinstance(n, int) and n >= 1):
            raise InputError(f"the number of slots must be an integer >= 1, got {n!r}")
        limit = position_limit(self)
        if not (isinstance(capacity, int) and 1 <= capacity <= limit):
            raise InputError(
                f"{capacity} cache positions per slot were asked for; this model holds 1..{limit} "
                "(an export's maximum sequence length: re-export with a larger --max-seq-len)"
            )
        self.new_cache(n, capacity)
        self.slots = Slots(capacity, np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, bool))

    def _slot(self, slot: int) -> Slots:
        if self.slots is None:
            raise InputError("no KV slots are open: call open_slots() (or prefill()) first")
        if not (isinstance(slot, int | np.integer) and 0 <= slot < self.slots.n):
            raise InputError(f"slot {slot!r} does not exist; slots are 0..{self.slots.n - 1}")
        return self.slots

    def prefill_slot(self, slot: int, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Run one prompt (normalized inputs of batch 1) into `slot`, replacing what it held;
        logits (V,) of its last position."""
        s = self._slot(slot)
        B, S = inputs["input_ids"].shape
        if B != 1:
            raise InputError(f"a slot takes one prompt, got a batch of {B}")
        if S > s.capacity:
            raise InputError(f"the prompt has {S} tokens; a slot holds {s.capacity} positions")
        s.used[slot] = False  # until the prompt is in: a failed prefill leaves the slot free
        logits, deltas = self.prefill_rows(int(slot), inputs)
        s.lengths[slot], s.deltas[slot], s.used[slot] = S, deltas[0], True
        return logits[0]

    def decode_slots(self, slots: Sequence[int] | np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """One token for each of `slots` (k distinct prefilled slots, each at its own length) in one
        step; logits (k, V) float32, row i for slots[i]."""
        if self.slots is None:
            raise InputError("decode before prefill: no KV slots are open")
        s = self.slots
        slots = np.asarray(slots, np.int64).reshape(-1)
        tokens = np.asarray(tokens, np.int64).reshape(-1)
        if slots.size == 0 or slots.shape != tokens.shape:
            raise InputError(f"decode needs one token per slot, got {tokens.size} for {slots.size} slots")
        if slots.min() < 0 or slots.max() >= s.n or np.unique(slots).size != slots.size:
            raise InputError(f"slots {slots.tolist()} must be distinct, in 0..{s.n - 1}")
        if not s.used[slots].all():
            raise InputError(f"slot(s) {slots[~s.used[slots]].tolist()} hold no prompt: prefill them first")
        full = slots[s.lengths[slots] >= s.capacity]
        if full.size:
            raise InputError(f"the KV cache of slot(s) {full.tolist()} is full ({s.capacity} positions)")
        logits = self.decode_rows(slots, tokens)
        s.lengths[slots] += 1
        return logits

    def free_slot(self, slot: int) -> None:
        """The slot takes a new prompt next; its entries are never attended to again."""
        s = self._slot(slot)
        s.used[slot] = False
        s.lengths[slot] = 0

    # ---- one batch: a pool of B slots, all prefilled together ------------------------------------------
    def prefill(self, inputs: dict[str, np.ndarray], capacity: int) -> np.ndarray:
        """Run the prompt batch, keep the KV cache (room for `capacity` positions); logits (B, V) float32."""
        B, S = inputs["input_ids"].shape
        if S > capacity:
            raise InputError(f"the prompt has {S} tokens but only {capacity} cache positions were asked for")
        self.open_slots(B, capacity)
        logits, deltas = self.prefill_rows(0, inputs)
        s = self.slots
        s.lengths[:], s.deltas[:], s.used[:] = S, deltas, True
        return logits

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Append one token per sequence (B,) int64; logits (B, V) float32."""
        if self.slots is None:
            raise InputError("decode() before prefill()")
        tokens = np.asarray(tokens, np.int64).reshape(-1)
        return self.decode_slots(np.arange(tokens.size), tokens)

    # ---- built on prefill and decode ------------------------------------------------------------------
    def generation_config(
        self,
        max_new_tokens: int = 128,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        max_seq_len: int | None = None,
        seed: int | None = None,
    ) -> GenerationConfig:
        check_generation_settings(  # as given: a NaN temperature must not hide behind do_sample=False
            max_new_tokens, temperature, top_k, top_p, repetition_penalty, max_seq_len, seed
        )
        cfg = self.config
        if eos_token_id is None:
            stop = tuple(cfg.eos_token_id)
        else:
            stop = tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (eos_token_id,)
        vocab = cfg.text.vocab_size
        bad = [
            t
            for t in stop
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab
        ]
        if bad:
            raise InputError(f"stop token ids must be integers in [0, {vocab}), got {bad}")
        stop = tuple(int(t) for t in stop)
        greedy = do_sample is False or (do_sample is None and not temperature)
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=0.0 if greedy else (1.0 if temperature is None else temperature),
            top_k=0 if greedy or top_k is None else top_k,
            top_p=1.0 if greedy or top_p is None else top_p,
            repetition_penalty=repetition_penalty,
            stop_tokens=stop,
            pad_token_id=cfg.pad_token_id if pad_token_id is None else pad_token_id,
            max_seq_len=max_seq_len or getattr(self, "max_seq_len", None) or GenerationConfig.max_seq_len,
            seed=seed,
        )

    def generate(
        self,
        input_ids=None,
        *,
        output_logits: bool = False,
        return_dict_in_generate: bool = False,
        max_new_tokens: int = 128,
        do_sample: bool | None = False,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        eos_token_id=None,
        pad_token_id=None,
        max_seq_len: int | None = None,
        seed: int | None = None,
        **inputs,
    ):
        """transformers-style: returns sequences, or an object with `.sequences` and `.logits`.

        Tensors come back in the kind they were given (torch in, torch out; otherwise NumPy).
        """
        inputs = {k: v for k, v in inputs.items() if k not in ("use_cache", "output_scores")}
        as_torch = hasattr(input_ids, "detach")
        gen = self.generation_config(
            max_new_tokens,
            do_sample,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            eos_token_id,
            pad_token_id,
            max_seq_len,
            seed,
        )
        checked = normalize_inputs({"input_ids": input_ids, **inputs}, self.config)
        with self.lock:
            out = generate(self, checked, gen)
        if as_torch:
            import torch

            out = GenerateOutput(
                torch.from_numpy(out.sequences), tuple(torch.from_numpy(x) for x in out.logits)
            )
        if return_dict_in_generate:
            return out if output_logits else GenerateOutput(out.sequences, [])
        return out.sequences

    def prepare(self, prompt: str, images=(), videos=(), system: str | None = None) -> dict[str, np.ndarray]:
        """One chat turn -> model inputs, through the checkpoint's processor and chat template."""
        if self.processor is None:
            raise InputError(
                "this model directory has no tokenizer files: pass token ids to generate() instead"
            )
        return chat_inputs(self.processor, prompt, images, videos, system)

    def stream(self, prompt: str, images=(), videos=(), **gen_kwargs) -> Iterator[str]:
        """Answer one prompt about images / video frames, yielding text as it is produced."""
        inputs = normalize_inputs(self.prepare(prompt, images, videos), self.config)
        gen = self.generation_config(**gen_kwargs)
        # the lock is held until the answer is complete or the generator is closed
        with self.lock:
            yield from stream_generate(self, inputs, self.processor.tokenizer, gen)
