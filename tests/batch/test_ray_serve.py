"""`slimm serve --ray` on a local Ray: 2 replicas answer through the `openai` client, a killed replica
is replaced and requests still succeed, and Ray Data sends rows to the endpoint (slimm.batch.client)."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
from batch_helpers import BACKEND

from slimm.serve.app import ServerSettings
from slimm.serve.ray_serve import REPLICA_HEADER

openai = pytest.importorskip("openai")
serve = pytest.importorskip("ray.serve")
NAME = "demo"


@pytest.fixture(scope="module")
def endpoint(ray_runtime):
    from slimm.serve.ray_serve import start

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    settings = ServerSettings(model_name=NAME)
    start(None, BACKEND, port=port, max_batch=2, max_queue=8, settings=settings, replicas=2)
    yield f"http://127.0.0.1:{port}/v1"
    serve.shutdown()


def ask(client, text: str = "Say something.") -> tuple[str, str]:
    r = client.chat.completions.with_raw_response.create(
        model=NAME, messages=[{"role": "user", "content": text}], max_tokens=6, temperature=0
    )
    return r.parse().choices[0].message.content, r.headers[REPLICA_HEADER]


def test_two_replicas_answer_through_openai(endpoint):
    client = openai.OpenAI(base_url=endpoint, api_key="none")
    assert [m.id for m in client.models.list().data] == [NAME]
    answers, replicas = set(), set()
    deadline = time.monotonic() + 60
    while len(replicas) < 2 and time.monotonic() < deadline:
        text, replica = ask(client)
        answers.add(text)
        replicas.add(replica)
    assert len(replicas) == 2, "one replica answered every request"
    assert len(answers) == 1 and next(iter(answers))  # greedy: both replicas give the same answer


def test_a_killed_replica_is_replaced(endpoint):
    client = openai.OpenAI(base_url=endpoint, api_key="none", max_retries=5)
    expected, victim = ask(client)
    os.kill(int(victim), signal.SIGKILL)
    replicas, deadline = set(), time.monotonic() + 120
    while len(replicas) < 2 and time.monotonic() < deadline:
        text, replica = ask(
            client
        )  # each request succeeds (the client retries one that hit the dead replica)
        assert text == expected
        replicas.add(replica)
        time.sleep(0.2)
    assert victim not in replicas and len(replicas) == 2, f"no replacement replica answered: {replicas}"


def test_ray_data_rows_to_the_endpoint(endpoint, ray_runtime, images, tmp_path):
    from slimm.batch.client import ChatClient

    _, paths = images
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    rows = [
        {"id": rid, "image": str(paths[rid]), "prompt": "What is it?"} for rid in ("img00.png", "a/img01.png")
    ]
    rows.append({"id": "bad", "image": str(broken), "prompt": "What is it?"})  # a 400 for that row only
    ds = ray_runtime.data.from_items(rows)
    # an HTTP client needs little CPU: the replicas hold most of this small cluster
    got = ds.map_batches(
        ChatClient,
        fn_constructor_kwargs={"base_url": endpoint, "max_tokens": 6},
        batch_format="pyarrow",
        batch_size=2,
        compute=ray_runtime.data.ActorPoolStrategy(size=1),
        num_cpus=0.1,
    ).take_all()
    got = {r["id"]: r for r in got}
    client = openai.OpenAI(base_url=endpoint, api_key="none")
    from slimm.batch.client import image_url

    for rid in ("img00.png", "a/img01.png"):
        direct = client.chat.completions.create(
            model=NAME,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_url(str(paths[rid]))}},
                        {"type": "text", "text": "What is it?"},
                    ],
                }
            ],
            max_tokens=6,
            temperature=0,
        )
        assert got[rid]["answer"] == direct.choices[0].message.content and got[rid]["error"] is None
    assert got["bad"]["answer"] is None and "cannot read it as an image" in got["bad"]["error"]
