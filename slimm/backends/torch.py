"""PyTorch backend: the project's own model code on a checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import torch

from slimm.errors import InputError
from slimm.model.runner import ModelRunner
from slimm.model.slimm import DTYPES, SliMMForConditionalGeneration


class TorchBackend(ModelRunner):
    name = "torch"

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
