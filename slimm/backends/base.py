"""The one backend interface: `prefill` and `decode` turn token ids into logits; `generate`,
`stream` and the transformers-style keyword API are built on them through slimm.generate.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np

from slimm.config import SliMMConfig
from slimm.errors import InputError
from slimm.generate import (
    GenerateOutput,
    GenerationConfig,
    check_generation_settings,
    generate,
    stream_generate,
)

INPUT_NAMES = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
)


def to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def normalize_inputs(inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Model inputs as NumPy arrays with checked ranks and dtypes."""
    unknown = set(inputs) - set(INPUT_NAMES)
    if unknown:
        raise InputError(
            f"unknown model inputs: {', '.join(sorted(unknown))}; expected some of {', '.join(INPUT_NAMES)}"
        )
    if inputs.get("input_ids") is None:
        raise InputError("input_ids is required")
    out = {k: to_numpy(v) for k, v in inputs.items() if v is not None}
    ids = out["input_ids"]
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
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
    out["attention_mask"] = mask.astype(np.int64)
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if pix in out:
            if grid not in out:
                raise InputError(f"{pix} given without {grid}")
            out[pix] = out[pix].astype(np.float32)
            out[grid] = out[grid].astype(np.int64).reshape(-1, 3)
    return out


class Backend(abc.ABC):
    """A loaded model in one framework. Subclasses implement `load`, `prefill` and `decode`."""

    name: ClassVar[str]

    def __init__(self, config: SliMMConfig, processor=None) -> None:
        self.config = config
        self.processor = processor  # slimm.processing.Processor, or None without tokenizer files

    @classmethod
    @abc.abstractmethod
    def load(cls, path, **kwargs) -> Backend: ...

    @abc.abstractmethod
    def prefill(self, inputs: dict[str, np.ndarray], capacity: int) -> np.ndarray:
        """Run the prompt, keep the KV cache (room for `capacity` positions); logits (B, V) float32."""

    @abc.abstractmethod
    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Append one token per sequence (B,) int64; logits (B, V) float32."""

    # ---- built on the two above ------------------------------------------------------------------
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
            stop = tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (int(eos_token_id),)
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
            max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty,
            eos_token_id, pad_token_id, max_seq_len, seed,
        )  # fmt: skip
        out = generate(self, normalize_inputs({"input_ids": input_ids, **inputs}), gen)
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
        content = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": content})
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return self.processor(text=[text], images=list(images) or None, videos=list(videos) or None)

    def stream(self, prompt: str, images=(), videos=(), **gen_kwargs) -> Iterator[str]:
        """Answer one prompt about images / video frames, yielding text as it is produced."""
        inputs = normalize_inputs(self.prepare(prompt, images, videos))
        yield from stream_generate(
            self, inputs, self.processor.tokenizer, self.generation_config(**gen_kwargs)
        )
