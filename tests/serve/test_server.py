"""`slimm serve` through the official `openai` client: plain and streamed answers, inline images,
multi-turn, usage, logprobs; concurrent requests each answered as if alone; a cancelled stream
frees its slot."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import image_part

from slimm.serve.engine import wait_idle


def ask(client, content, **kw):
    kw = {"max_tokens": 8, "temperature": 0, **kw}
    return client.chat.completions.create(model="demo", messages=[{"role": "user", "content": content}], **kw)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["demo"]
    r = httpx.get(server[0] + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["max_batch"] == 4


def test_plain_answer_with_usage(client):
    r = ask(client, "Hello there", max_tokens=6, logprobs=True)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == len(c.logprobs.content) <= 6
    assert (
        r.usage.prompt_tokens > 5
        and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    )
    # the random-weight demo never picks its stop token this early: the limit ends it
    assert c.finish_reason == "length" and r.usage.completion_tokens == 6


def test_stream_equals_plain_answer(client):
    plain = ask(client, "Tell me a story", max_tokens=10)
    chunks = list(
        ask(client, "Tell me a story", max_tokens=10, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_images_several_and_multi_turn(client):
    one = ask(client, [image_part(56, 56), {"type": "text", "text": "What is this?"}])
    big = ask(client, [image_part(112, 112), {"type": "text", "text": "What is this?"}])
    # 56x56: 2x2 merged tokens, 112x112: 4x4 (14-px patches, 2x2 merged)
    assert big.usage.prompt_tokens - one.usage.prompt_tokens == 16 - 4
    two = ask(
        client, [image_part(56, 56), image_part(112, 56, seed=1), {"type": "text", "text": "What is this?"}]
    )
    assert two.usage.prompt_tokens - one.usage.prompt_tokens == 8 + 2  # its tokens and <|vision_start/end|>
    turns = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [image_part(56, 56), {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": one.choices[0].message.content},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}, image_part(56, 84, seed=2)]},
    ]
    r = client.chat.completions.create(model="demo", messages=turns, max_tokens=5, temperature=0)
    assert r.usage.prompt_tokens > one.usage.prompt_tokens + 6 + 4
    assert r.usage.completion_tokens == 5


def test_logprobs(client):
    r = ask(client, "Count", max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert t.token == t.top_logprobs[0].token and t.logprob == pytest.approx(tops[0])  # greedy: the best
        assert bytes(t.bytes).decode() == t.token
    assert "".join(t.token for t in content) == r.choices[0].message.content


SHAPES = [
    [image_part(56, 56), {"type": "text", "text": "Describe."}],
    "Just text, short.",
    [image_part(112, 84, seed=3), {"type": "text", "text": "What do you see in this picture?"}],
    "A longer text-only question that takes a good many more tokens than the others do, on purpose.",
    [image_part(56, 112, seed=4), image_part(84, 56, seed=5), {"type": "text", "text": "Two."}],
    [{"type": "text", "text": "Before"}, image_part(140, 140, seed=6), {"type": "text", "text": "after."}],
    "Hi",
    [image_part(84, 84, seed=7), {"type": "text", "text": "Colours?"}],
]


def test_concurrent_requests_answer_as_if_alone(server, client):
    lengths = [4, 12, 7, 9, 5, 11, 6, 8]  # they finish at different steps; 8 requests through 4 slots

    def run(i):
        r = ask(client, SHAPES[i], max_tokens=lengths[i], logprobs=True)
        return (
            [t.token for t in r.choices[0].logprobs.content],
            r.choices[0].message.content,
            r.usage.prompt_tokens,
        )

    alone = [run(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, range(8), timeout=120))
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert a == b, f"request {i} answered differently beside the others"
    assert wait_idle(server[1], 10)


def test_cancelled_stream_frees_its_slot(server, client):
    engine = server[1]
    stream = ask(client, "Go on and on", max_tokens=200, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    assert engine.stats()["running"] == 1
    stream.close()
    assert wait_idle(engine, 10), engine.stats()
    assert ask(client, "Still there?", max_tokens=3).usage.completion_tokens == 3


def test_queue_full_is_429_with_retry_after(torch_demo):
    from openai import OpenAI
    from serve_helpers import running_server

    with running_server(torch_demo, max_batch=1, max_queue=1) as (url, engine):
        client = OpenAI(base_url=url + "/v1", api_key="x", timeout=60, max_retries=0)
        stream = ask(client, "Occupy the slot", max_tokens=200, stream=True)
        next(iter(stream))
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(ask, client, "I wait", max_tokens=2)
            end = time.monotonic() + 10
            while engine.stats()["waiting"] == 0:
                assert time.monotonic() < end
                time.sleep(0.01)
            r = httpx.post(
                url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "x"}]},
                timeout=10,
            )
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert "already waiting" in r.json()["error"]["message"]
            stream.close()
            assert queued.result(timeout=30).usage.completion_tokens == 2


def test_a_failing_request_gets_500_and_the_others_go_on(server, client, torch_demo, monkeypatch):
    marker = torch_demo.processor.tokenizer.encode(" xyzzy")[0]
    real = torch_demo.prefill_rows

    def prefill_rows(first, inputs):
        if (inputs["input_ids"] == marker).any():
            raise RuntimeError("simulated failure")
        return real(first, inputs)

    monkeypatch.setattr(torch_demo, "prefill_rows", prefill_rows)
    stream = ask(client, "A long answer", max_tokens=40, stream=True)
    next(iter(stream))
    r = httpx.post(
        server[0] + "/v1/chat/completions",
        timeout=30,
        json={"messages": [{"role": "user", "content": "please xyzzy"}], "max_tokens": 3},
    )
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and "RuntimeError" in err["message"] and "Traceback" not in r.text
    assert sum(1 for _ in stream) > 0  # the running stream went on to its end
    assert ask(client, "And me?", max_tokens=2).usage.completion_tokens == 2


def test_metrics_count_requests_tokens_and_latencies(server, client):
    def scrape():
        text = httpx.get(server[0] + "/metrics", timeout=10).text
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }

    before = scrape()
    r = ask(client, "Measure me", max_tokens=4)
    after = scrape()

    def grew(key):
        return after.get(key, 0) - before.get(key, 0)

    assert grew('slimm_requests_total{reason="length"}') == 1
    assert grew("slimm_generation_tokens_total") == 4
    assert grew("slimm_prompt_tokens_total") == r.usage.prompt_tokens
    assert grew("slimm_time_to_first_token_seconds_count") == 1
    assert grew("slimm_inter_token_latency_seconds_count") == 3
    # the first token comes from the prefill, the other 3 from decode steps of this request alone
    assert grew("slimm_decode_steps_total") == 3 and grew("slimm_decode_tokens_total") == 3
    assert grew("slimm_decode_seconds_total") > 0 and grew("slimm_prefill_seconds_total") > 0
    assert after["slimm_queue_depth"] == 0 and after["slimm_max_batch"] == 4
