"""The visual cache: vision-encoder outputs kept by the content hash of an image's preprocessed pixels and
grid, least recently used first out, bounded in bytes. Chat clients re-send every image on every turn;
with this a follow-up turn skips the vision encoder (a backend's prefill calls `encode` when it is set).
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

# encode(pixels (R, W), grid (n, 3)) -> (tokens (L, d), deepstack slices (K, L, d) or None); NumPy or torch
Encode = Callable[[Any, np.ndarray], tuple[Any, Any]]


class VisualCache:
    """LRU of (tokens, slices) per image, at most `max_bytes` of them; thread-safe."""

    def __init__(self, max_bytes: int, merge: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the visual cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.merge = merge  # spatial_merge_size: an image of grid (t, h, w) gives t*h*w / merge**2 tokens
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: collections.OrderedDict[bytes, tuple[Any, Any, int]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def encode(self, pixels: Any, grid: np.ndarray, encode: Encode) -> tuple[Any, Any]:
        """What `encode(pixels, grid)` returns, with each image found by its hash taken from the cache
        and the others encoded together in one call."""
        grid = np.asarray(grid.cpu() if hasattr(grid, "cpu") else grid, np.int64).reshape(-1, 3)
        rows = grid.prod(1)
        starts = np.concatenate([[0], np.cumsum(rows)])
        flat = _numpy(pixels)
        keys = [_key(flat[starts[i] : starts[i + 1]], g) for i, g in enumerate(grid)]
        found: dict[int, tuple[Any, Any]] = {}
        with self._lock:
            for i, k in enumerate(keys):
                if k in self._entries:
                    self._entries.move_to_end(k)
                    found[i] = self._entries[k][:2]
            self.hits += len(found)
            self.misses += len(keys) - len(found)
        missing = [i for i in range(len(keys)) if i not in found]
        if missing:
            if len(missing) == len(keys):
                tokens, slices = encode(pixels, grid)
            else:
                picked = _cat([pixels[starts[i] : starts[i + 1]] for i in missing], 0)
                tokens, slices = encode(picked, grid[missing])
            counts = rows[missing] // (self.merge * self.merge)
            at = np.concatenate([[0], np.cumsum(counts)])
            for j, i in enumerate(missing):
                # copies: a view would keep the whole batch's output alive behind a small entry
                t = _copy(tokens[at[j] : at[j + 1]])
                s = None if slices is None else _copy(slices[:, at[j] : at[j + 1]])
                found[i] = (t, s)
                self._put(keys[i], t, s)
            if len(missing) == len(keys):
                return tokens, slices  # nothing was cached: the encoder's own output, as it came
        parts = [found[i] for i in range(len(keys))]
        tokens = _cat([p[0] for p in parts], 0)
        slices = None if parts[0][1] is None else _cat([p[1] for p in parts], 1)
        return tokens, slices

    def _put(self, key: bytes, tokens: Any, slices: Any) -> None:
        size = _nbytes(tokens) + (0 if slices is None else _nbytes(slices))
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (tokens, slices, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, _, old) = self._entries.popitem(last=False)
                self.bytes -= old

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "bytes": self.bytes,
                "entries": len(self._entries),
                "max_bytes": self.max_bytes,
            }


def _key(pixels: np.ndarray, grid: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=20)
    h.update(np.asarray(grid, np.int64).tobytes())
    h.update(str(pixels.dtype).encode())
    h.update(np.ascontiguousarray(pixels).data)
    return h.digest()


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _nbytes(x: Any) -> int:
    return x.numel() * x.element_size() if hasattr(x, "element_size") else np.asarray(x).nbytes


def _copy(x: Any) -> Any:
    return x.clone() if hasattr(x, "clone") else np.array(x)


def _cat(xs: list[Any], axis: int) -> Any:
    if hasattr(xs[0], "detach"):
        import torch

        return torch.cat(xs, dim=axis)
    return np.concatenate([np.asarray(x) for x in xs], axis=axis)
