"""Converted backends (jax, paddle, mindspore): the parts as each framework's own saved artifacts,
loaded without onnx, onnxruntime or torch, run by the shared parts runtime."""

from __future__ import annotations

from pathlib import Path

from slimm.backends.parts import PartsBackend
from slimm.errors import BackendUnavailable, CheckpointError
from slimm.manifest import PARTS, read_manifest


def bucket(n: int, limit: int) -> int:
    """Round a length up so that few distinct shapes reach the compiler: 16, 32, 64, ... then
    multiples of 1024; never past `limit`."""
    size = 16
    while size < n and size < 1024:
        size *= 2
    if size < n:
        size = -(-n // 1024) * 1024
    return min(max(size, n), limit)


class NativeBackend(PartsBackend):
    target = ""

    def __init__(self, converted_dir, **options) -> None:
        from slimm.convert import get_target
        from slimm.convert.convert import converted_format, framework_version

        converted_dir = Path(converted_dir)
        manifest = read_manifest(converted_dir, fmt=converted_format(self.target))
        try:
            self.tgt = get_target(self.target)
            have = framework_version(self.target)
        except ImportError as e:
            raise BackendUnavailable(f"backend {self.target!r} needs its framework installed ({e})") from None
        if manifest.get("framework_version") != have:
            raise CheckpointError(
                f"{converted_dir}: converted with {self.target} {manifest.get('framework_version')}, but this is "
                f"{self.target} {have}: run `slimm convert` again with this version"
            )
        super().__init__(converted_dir, manifest)
        self.name = self.target
        self.parts = {p: self.tgt.load(converted_dir, manifest["parts"][p]["name"], **options) for p in PARTS}
        self.order = {p: manifest["parts"][p]["input_order"] for p in PARTS}

    @classmethod
    def load(cls, path, **options):
        options.pop("device", None)  # CPU here; the frameworks pick their device themselves
        return cls(path, **options)

    def run_part(self, part, feeds):
        return self.parts[part](*[feeds[n] for n in self.order[part]])

    def to_numpy(self, x):
        return self.tgt.to_numpy(x)

    def prefill(self, inputs, capacity):
        """Prompt lengths and cache sizes rounded up to buckets (left padding, masked): a handful
        of shapes to compile, and the decode step's shapes fixed for the whole run."""
        import numpy as np

        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        S = ids.shape[1]
        target = bucket(S, self.max_seq_len)
        if target > S:
            pad = target - S
            inputs = dict(inputs)
            inputs["input_ids"] = np.concatenate(
                [np.full((ids.shape[0], pad), self.config.pad_token_id, np.int64), ids], 1
            )
            inputs["attention_mask"] = np.concatenate([np.zeros((ids.shape[0], pad), np.int64), mask], 1)
        capacity = bucket(capacity + (target - S), self.max_seq_len)
        return super().prefill(inputs, capacity)


class JaxBackend(NativeBackend):
    target = "jax"


class PaddleBackend(NativeBackend):
    target = "paddle"


class MindSporeBackend(NativeBackend):
    target = "mindspore"
