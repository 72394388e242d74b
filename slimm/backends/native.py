"""Converted backends (jax, paddle, mindspore): the parts as each framework's own saved artifacts,
loaded without onnx, onnxruntime or torch, run by the shared parts runtime."""

from __future__ import annotations

from pathlib import Path

from slimm import frameworks
from slimm.backends.parts import PartsBackend
from slimm.errors import BackendUnavailable, CheckpointError, InputError
from slimm.export.manifest import PARTS, Manifest


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
    """A converted directory of one target framework (`target`, a slimm.frameworks name)."""

    target = ""

    def __init__(self, converted_dir, **options) -> None:
        from slimm.convert import converted_format, get_runtime

        converted_dir = Path(converted_dir)
        manifest = Manifest.read(converted_dir, fmt=converted_format(self.target))
        self.framework = frameworks.get(self.target)
        try:
            self.tgt = get_runtime(self.target)  # starts the framework (slimm.frameworks)
            have = frameworks.version(self.target)
        except ImportError as e:
            raise BackendUnavailable(f"backend {self.target!r} needs its framework installed ({e})") from None
        if manifest.framework_version != have:
            raise CheckpointError(
                f"{converted_dir}: converted with {self.target} {manifest.framework_version}, but this is "
                f"{self.target} {have}: run `slimm convert` again with this version"
            )
        super().__init__(converted_dir, manifest)
        self.name = self.target
        self.parts = {p: self.tgt.load(converted_dir, manifest.parts[p].name, **options) for p in PARTS}
        self.order = {p: manifest.parts[p].input_order for p in PARTS}

    @classmethod
    def load(cls, path, target: str | None = None, **options):
        """`NativeBackend.load(path, target="paddle")` gives the target's own class."""
        options.pop("device", None)  # CPU here; the frameworks pick their device themselves
        if target is not None and target != cls.target:
            known = {c.target: c for c in NativeBackend.__subclasses__()}
            if target not in known:
                raise InputError(f"no converted backend for {target!r}; one of {', '.join(known)}")
            cls = known[target]
        return cls(path, **options)

    def past_length(self, needed):
        return self.past_mask.shape[1]  # compiled frameworks: the pool's bucketed capacity, one shape

    def cache_feeds(self, lo, hi, length=None):
        # frameworks may read a NumPy input after the call returns (asynchronous dispatch, zero-copy
        # on CPU): hand them a snapshot of the mask, which the host updates in place afterwards
        feeds = super().cache_feeds(lo, hi, length)
        feeds["past_mask"] = feeds["past_mask"].copy()
        return feeds

    def run_part(self, part, feeds):
        return self.parts[part](*[feeds[n] for n in self.order[part]])

    def to_numpy(self, x):
        return self.framework.to_numpy(x)

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
    """Keeps the KV cache as JAX arrays: new entries are written in place (donated buffers), so a
    decode step moves neither the cache to the host nor a copy of it."""

    target = "jax"

    def new_cache(self, n, capacity):
        import jax
        import jax.numpy as jnp
        import numpy as np

        t = self.config.text
        shape = (n, t.num_key_value_heads, capacity, t.head_dim)
        self.keys = [jnp.zeros(shape, self.float) for _ in range(t.num_hidden_layers)]
        self.values = [jnp.zeros(shape, self.float) for _ in range(t.num_hidden_layers)]
        self.past_mask = np.zeros((n, capacity), np.int64)
        if not hasattr(self, "_update"):

            def update(keys, values, new_keys, new_values, src, rows, idx):
                def put(buf, new):
                    # rows (k, 1) and idx (k, S) index together around the head axis: (k, S, KV, D)
                    return buf.at[rows[:, None], :, idx].set(new[src].transpose(0, 2, 1, 3).astype(buf.dtype))

                keys = [put(b, n) for b, n in zip(keys, new_keys, strict=True)]
                return keys, [put(b, n) for b, n in zip(values, new_values, strict=True)]

            # every layer's buffers in one call (one dispatch a step, not one per buffer), updated in place
            self._update = jax.jit(update, donate_argnums=(0, 1))

    def write_cache(self, presents, src, rows, offsets, cur_mask):
        import numpy as np

        n = self.config.text.num_hidden_layers
        idx = offsets[:, None] + np.arange(cur_mask.shape[1])  # (k, S) positions written in each row
        self.keys, self.values = self._update(
            self.keys, self.values, list(presents[:n]), list(presents[n : 2 * n]), src, rows, idx
        )
        self.past_mask[rows[:, None], idx] = cur_mask[src]


class PaddleBackend(NativeBackend):
    target = "paddle"


class MindSporeBackend(NativeBackend):
    target = "mindspore"
