"""`n` choices, video parts (a base64 video file as vLLM's `video_url`, or a list of frames) and local
files under --allowed-local-dir, through the official `openai` client; and their refusals."""

from __future__ import annotations

import base64
import io
import os

import httpx
import numpy as np
import pytest
from serve_helpers import image_url, running_server


@pytest.fixture(scope="module")
def media(torch_demo, tmp_path_factory):
    """A server that reads files under an allowed directory; (url, engine, allowed dir, outside dir)."""
    root = tmp_path_factory.mktemp("media")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    with running_server(torch_demo, capacity=1024, allowed_local_dir=str(allowed)) as (url, engine):
        yield url, engine, allowed, outside


@pytest.fixture
def oclient(media):
    from openai import OpenAI

    return OpenAI(base_url=media[0] + "/v1", api_key="unused", timeout=120, max_retries=0)


def ask(client, content, **kw):
    kw = {"max_tokens": 5, "temperature": 0, **kw}
    return client.chat.completions.create(model="demo", messages=[{"role": "user", "content": content}], **kw)


def post(url, content, **kw):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **kw}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def png_bytes(w, h, seed=0) -> bytes:
    return base64.b64decode(image_url(w, h, seed).split(",", 1)[1])


def mp4_bytes(frames: int = 8, size: int = 56, fps: int = 4) -> bytes:
    av = pytest.importorskip("av")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(
                rng.integers(0, 256, (size, size, 3), np.uint8), format="rgb24"
            )
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


TEXT = {"type": "text", "text": "What happens?"}


# ---- n ----------------------------------------------------------------------------------------------------
def test_n_greedy_choices_are_the_single_answer(oclient):
    one = ask(oclient, "Name three colours", max_tokens=6)
    three = ask(oclient, "Name three colours", max_tokens=6, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt is counted once
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens


def test_n_sampled_choice_i_draws_from_seed_plus_i(oclient):
    kw = {"max_tokens": 8, "temperature": 1.0}
    three = ask(oclient, "Tell me anything", n=3, seed=40, **kw)
    texts = [c.message.content for c in three.choices]
    assert len(set(texts)) > 1  # each choice its own draw
    for i in range(3):
        assert ask(oclient, "Tell me anything", seed=40 + i, **kw).choices[0].message.content == texts[i]


def test_n_streamed(oclient):
    chunks = list(ask(oclient, "Stream two", n=2, stream=True, stream_options={"include_usage": True}))
    text = {0: "", 1: ""}
    finish = {}
    for c in chunks:
        for ch in c.choices:
            text[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    plain = ask(oclient, "Stream two", n=2)
    assert text == {c.index: c.message.content for c in plain.choices}
    assert finish == {0: "length", 1: "length"} and chunks[-1].usage.completion_tokens == 10


# ---- video --------------------------------------------------------------------------------------------------
def test_video_as_frames(oclient):
    text_only = ask(oclient, [TEXT])
    frames = {"type": "video", "video": [image_url(56, 56, seed=k) for k in range(4)]}
    r = ask(oclient, [frames, TEXT])
    # 4 frames of 56x56: 2 temporal patches x 2x2 merged tokens, and <|vision_start/end|>
    assert r.usage.prompt_tokens - text_only.usage.prompt_tokens == 2 * 4 + 2
    assert r.usage.completion_tokens == 5


def test_video_url_base64(oclient):
    video = "data:video/mp4;base64," + base64.b64encode(mp4_bytes()).decode()
    text_only = ask(oclient, [TEXT])
    r = ask(oclient, [{"type": "video_url", "video_url": {"url": video}}, TEXT])
    # 8 frames at 4 fps = 2 s, sampled at 2 a second: 4 frames of 56x56, as in the frame list above
    assert r.usage.prompt_tokens - text_only.usage.prompt_tokens == 2 * 4 + 2
    assert r.usage.completion_tokens == 5


def test_video_frames_over_the_limit(media):
    frames = {"type": "video", "video": [image_url(28, 28)] * 33}
    r = post(media[0], [frames, TEXT])
    assert r.status_code == 400 and "at most 32" in r.json()["error"]["message"]


# ---- local files ---------------------------------------------------------------------------------------------
def test_local_image_inside_the_allowed_dir(oclient, media):
    url, _, allowed, _ = media
    (allowed / "a.png").write_bytes(png_bytes(56, 56, seed=5))
    inline = ask(oclient, [{"type": "image_url", "image_url": {"url": image_url(56, 56, seed=5)}}, TEXT])
    local = ask(oclient, [{"type": "image_url", "image_url": {"url": f"file://{allowed / 'a.png'}"}}, TEXT])
    assert local.choices[0].message.content == inline.choices[0].message.content
    assert local.usage.prompt_tokens == inline.usage.prompt_tokens


def test_local_video_inside_the_allowed_dir(oclient, media):
    (media[2] / "v.mp4").write_bytes(mp4_bytes())
    r = ask(oclient, [{"type": "video_url", "video_url": {"url": f"file://{media[2] / 'v.mp4'}"}}, TEXT])
    assert r.usage.completion_tokens == 5


@pytest.mark.parametrize("how", ["outside", "traversal", "symlink", "missing", "directory", "host"])
def test_local_files_outside_are_refused(media, how):
    url, _, allowed, outside = media
    (outside / "secret.png").write_bytes(png_bytes(56, 56))
    if how == "symlink":
        link = allowed / "link.png"
        if not link.exists():
            os.symlink(outside / "secret.png", link)
    target = {
        "outside": f"file://{outside / 'secret.png'}",
        "traversal": f"file://{allowed}/../outside/secret.png",
        "symlink": f"file://{allowed / 'link.png'}",
        "missing": f"file://{allowed / 'nope.png'}",
        "directory": f"file://{allowed}",
        "host": f"file://example.com{allowed / 'a.png'}",
    }[how]
    r = post(url, [{"type": "image_url", "image_url": {"url": target}}, TEXT])
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    words = {"missing": "not a file", "directory": "not a file", "host": "file:///absolute"}.get(
        how, "outside the directory"
    )
    assert words in message and "Traceback" not in r.text
    # a refusal outside the directory does not tell whether the file exists
    if how == "outside":
        gone = post(url, [{"type": "image_url", "image_url": {"url": f"file://{outside / 'x.png'}"}}, TEXT])
        assert gone.json()["error"]["message"].replace("x.png", "secret.png") == message
