"""The visual cache: a follow-up turn re-sending an image skips the vision encoder and answers with the
same greedy tokens, on the torch and onnx backends; the cache stays inside its byte bound."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from serve_helpers import image_part, running_server

from slimm.serve.visual_cache import VisualCache


@pytest.fixture(scope="module", params=["torch", "onnx"])
def cached_server(request, demo_dir, exported):
    import slimm

    if request.param == "onnx":
        pytest.importorskip("onnxruntime")
        backend = slimm.load(exported("plain"), backend="onnx")
    else:
        backend = slimm.load(demo_dir("plain"), backend="torch")
    with running_server(backend, capacity=256, visual_cache_mb=64) as (url, engine):
        yield url, engine, backend


def encoder_calls(backend, monkeypatch) -> list[int]:
    """Count the images each call of the backend's vision encoder gets."""
    calls: list[int] = []
    owner, name = (backend.model.visual, "encode") if backend.name == "torch" else (backend, "encode_visual")
    real = getattr(owner, name)

    def spy(pixels, grid):
        calls.append(int(np.asarray(grid).reshape(-1, 3).shape[0]))
        return real(pixels, grid)

    monkeypatch.setattr(owner, name, spy)
    return calls


def chat(url, messages, max_tokens=6):
    r = httpx.post(
        url + "/v1/chat/completions",
        json={"messages": messages, "max_tokens": max_tokens, "temperature": 0, "logprobs": True},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    return [t["token"] for t in body["choices"][0]["logprobs"]["content"]], body


def cache_counts(url) -> tuple[float, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return float(values["slimm_visual_cache_hits_total"]), float(values["slimm_visual_cache_misses_total"])


def test_second_turn_with_the_same_image_skips_the_encoder(cached_server, monkeypatch):
    url, _, backend = cached_server
    calls = encoder_calls(backend, monkeypatch)
    first_turn = [
        {"role": "user", "content": [image_part(84, 56, seed=11), {"type": "text", "text": "What?"}]}
    ]
    hits0, misses0 = cache_counts(url)
    tokens, body = chat(url, first_turn)
    assert calls == [1] and cache_counts(url) == (hits0, misses0 + 1)
    again, _ = chat(url, first_turn)
    assert again == tokens, "the cached encoding answered differently"
    assert calls == [1] and cache_counts(url) == (hits0 + 1, misses0 + 1)
    # the chat client's next turn: the whole conversation, the image included, is sent again
    second_turn = [
        *first_turn,
        {"role": "assistant", "content": body["choices"][0]["message"]["content"]},
        {"role": "user", "content": "And its colour?"},
    ]
    chat(url, second_turn)
    assert calls == [1] and cache_counts(url) == (hits0 + 2, misses0 + 1)


def test_a_new_image_beside_a_cached_one_encodes_only_the_new(cached_server, monkeypatch):
    url, _, backend = cached_server
    calls = encoder_calls(backend, monkeypatch)
    a, b = image_part(56, 56, seed=21), image_part(56, 112, seed=22)
    chat(url, [{"role": "user", "content": [a, {"type": "text", "text": "One."}]}])
    both = [{"role": "user", "content": [a, b, {"type": "text", "text": "Two."}]}]
    tokens, _ = chat(url, both)
    assert calls == [1, 1]  # b alone went through the encoder
    again, _ = chat(url, both)
    assert again == tokens and calls == [1, 1]


def test_cached_answer_equals_uncached(cached_server):
    url, engine, backend = cached_server
    msgs = [{"role": "user", "content": [image_part(112, 56, seed=31), {"type": "text", "text": "Say."}]}]
    chat(url, msgs)  # now cached
    cached, _ = chat(url, msgs)
    keep, engine.backend.visual_cache = backend.visual_cache, None
    try:
        plain, _ = chat(url, msgs)
    finally:
        backend.visual_cache = keep
    assert cached == plain


def test_off_means_no_cache(torch_demo):
    with running_server(torch_demo, visual_cache_mb=0) as (url, engine):
        assert engine.visual_cache is None and torch_demo.visual_cache is None
        assert "slimm_visual_cache" not in httpx.get(url + "/metrics", timeout=10).text


def test_lru_stays_inside_its_bound():
    def encode(pixels, grid):  # 4 tokens of 8 float32 per 16-row image: 128 bytes each
        n = int(np.asarray(grid).prod(1).sum()) // 4
        return np.repeat(pixels[::4, :1], 8, axis=1)[:n].astype(np.float32), None

    cache = VisualCache(3 * 128, merge=2)
    grid = np.array([[1, 4, 4]])
    images = [np.full((16, 3), i, np.float32) for i in range(4)]
    for im in images:
        cache.encode(im, grid, encode)
    s = cache.stats()
    assert s["entries"] == 3 and s["bytes"] == 3 * 128 and s["misses"] == 4
    cache.encode(images[0], grid, encode)  # the oldest was dropped
    assert cache.stats()["misses"] == 5
    cache.encode(images[3], grid, encode)  # the newest is still there
    assert cache.stats()["hits"] == 1
    tokens, _ = cache.encode(np.concatenate([images[3], images[1]]), np.repeat(grid, 2, 0), encode)
    assert tokens.shape == (8, 8) and (tokens[:4] == 3).all() and (tokens[4:] == 1).all()
