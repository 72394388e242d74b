"""`slimm serve` on a converted backend (JAX): the same engine over the parts runtime answers
concurrent requests as if each ran alone, with the visual cache and a JSON schema."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import image_part, running_server


@pytest.fixture(scope="module")
def jax_server(converted):
    import slimm

    backend = slimm.load(converted("jax"), backend="jax")
    with running_server(backend, max_batch=2, capacity=256) as (url, engine):
        yield url, engine


def chat(url, content, **kw):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0, **kw}
    r = httpx.post(url + "/v1/chat/completions", json={**body, "logprobs": True}, timeout=600)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return [t["token"] for t in choice["logprobs"]["content"]], choice


SHAPES = [
    [image_part(56, 56, seed=41), {"type": "text", "text": "What is it?"}],
    "Only text here.",
    [image_part(84, 56, seed=42), {"type": "text", "text": "And this?"}],
]


def test_jax_concurrent_requests_answer_as_if_alone(jax_server):
    url, engine = jax_server
    alone = [chat(url, s)[0] for s in SHAPES]
    with ThreadPoolExecutor(3) as pool:  # three requests through two slots
        together = list(pool.map(lambda s: chat(url, s)[0], SHAPES, timeout=600))
    assert together == alone
    stats = engine.visual_cache.stats()
    assert stats["hits"] >= 2 and stats["misses"] == 2  # each image encoded once


def test_jax_json_schema(jax_server):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    _, choice = chat(jax_server[0], "JSON please", response_format=fmt, max_tokens=30)
    answer = json.loads(choice["message"]["content"])
    assert choice["finish_reason"] == "stop" and set(answer) == {"ok", "n"} and answer["n"] in (1, 2, 3)
