"""Every refusal of `slimm serve` is an HTTP status with an OpenAI-style JSON error naming the problem,
and no traceback; the server answers normally afterwards."""

from __future__ import annotations

import httpx
import pytest
from serve_helpers import image_part, image_url, running_server


@pytest.fixture(scope="module")
def strict(torch_demo):
    """A server with small limits and an API key."""
    with running_server(
        torch_demo,
        capacity=128,
        api_key="sekret",
        max_body_bytes=256 * 1024,
        max_images=2,
        max_image_pixels=120 * 120,
    ) as (url, _):
        yield url


def post(url, body=None, key="sekret", content=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(url + "/v1/chat/completions", content=content, headers=headers, timeout=30)
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=30)


def user(*parts, **kw):
    return {"messages": [{"role": "user", "content": list(parts)}], "max_tokens": 2, **kw}


TEXT = {"type": "text", "text": "hi"}

# name -> (request body or raw bytes, status, words the message holds)
CASES = {
    "no key": (user(TEXT), 401, "API key", None),
    "wrong key": (user(TEXT), 401, "API key", "nope"),
    "malformed JSON": (b'{"messages": [', 400, "malformed JSON", "sekret"),
    "not an object": (b"[1, 2]", 422, "body", "sekret"),
    "no messages": ({"max_tokens": 2}, 422, "messages: Field required", "sekret"),
    "bad temperature": (user(TEXT, temperature="hot"), 422, "temperature", "sekret"),
    "unknown role": ({"messages": [{"role": "robot", "content": "x"}]}, 422, "messages.0.role", "sekret"),
    "unknown part type": (user({"type": "input_audio", "x": 1}), 422, "messages.0.content", "sekret"),
    "n over the limit": (user(TEXT, n=9), 400, "n = 9", "sekret"),
    "other model": (user(TEXT, model="gpt-4o"), 404, "'gpt-4o' does not exist", "sekret"),
    "empty stop": (user(TEXT, stop=[""]), 400, "stop strings must not be empty", "sekret"),
    "too many images": (
        user(image_part(56, 56), image_part(56, 56), image_part(56, 56)),
        400,
        "at most 2",
        "sekret",
    ),
    "too many pixels": (user(image_part(168, 112)), 400, "at most 14400", "sekret"),
    "remote image": (
        user({"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}),
        400,
        "remote image URLs are not fetched",
        "sekret",
    ),
    "local path": (
        user({"type": "image_url", "image_url": {"url": "/etc/passwd"}}),
        400,
        "data:image",
        "sekret",
    ),
    "file URL without --allowed-local-dir": (
        user({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}),
        400,
        "--allowed-local-dir",
        "sekret",
    ),
    "remote video": (
        user({"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}),
        400,
        "remote video URLs are not fetched",
        "sekret",
    ),
    "not a video": (
        user({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,aGVsbG8="}}),
        400,
        "cannot read it",
        "sekret",
    ),
    "an image as a video": (
        user({"type": "video_url", "video_url": {"url": image_url(56, 56)}}),
        400,
        "data:video",
        "sekret",
    ),
    "not an image": (
        user({"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}),
        400,
        "cannot read it as an image",
        "sekret",
    ),
    "bad base64": (
        user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}),
        400,
        "bad base64",
        "sekret",
    ),
    "prompt over the context": (user({"type": "text", "text": "word " * 200}), 400, "positions", "sekret"),
    "prompt + max_tokens over the context": (
        user(TEXT, max_tokens=120),
        400,
        "+ 120 answer tokens",
        "sekret",
    ),
    "body too large": (
        user({"type": "text", "text": "x" * 270_000}),
        413,
        "larger than 262144 bytes",
        "sekret",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_refusal(strict, name):
    body, status, words, key = CASES[name]
    r = post(strict, body, key) if not isinstance(body, bytes) else post(strict, key=key, content=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"], err
    assert err["type"] and err["code"] == str(status)
    assert "Traceback" not in r.text and 'File "' not in r.text


def test_prompt_over_the_context_names_both_lengths(strict):
    err = post(strict, user({"type": "text", "text": "word " * 200})).json()["error"]["message"]
    assert "positions this server's context holds" in err and "128" in err
    prompt = int(err.split("the prompt has ")[1].split()[0])
    assert prompt > 128


def test_unknown_fields_are_ignored_and_key_accepted(strict):
    body = user(TEXT, frequency_penalty=0.5, user="someone", parallel_tool_calls=False, top_k=5)
    body["messages"][0]["content"].append(
        {"type": "image_url", "image_url": {"url": image_url(56, 56), "x": 1}}
    )
    r = post(strict, body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_health_needs_no_key(strict):
    assert httpx.get(strict + "/health", timeout=10).status_code == 200
    assert httpx.get(strict + "/v1/models", timeout=10).status_code == 401
