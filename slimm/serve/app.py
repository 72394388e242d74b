"""The ASGI app of `slimm serve`: OpenAI's chat completions, models and health routes over one Engine.

Handlers stay thin: requests arrive as slimm.serve.protocol models, every refusal leaves through one
place as an OpenAI-style error body, and no traceback reaches a client.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import ipaddress
import json
import logging
import secrets
import tempfile
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from importlib import resources
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from slimm.backends.base import normalize_inputs
from slimm.errors import InputError, SliMMError
from slimm.serve import protocol as P
from slimm.serve.engine import Delta, Engine, EngineStopped, Failed, Finished, QueueFull, SamplingParams
from slimm.serve.engine import Request as EngineRequest
from slimm.serve.grammar import response_format_dict

log = logging.getLogger("slimm.serve")


@dataclass(frozen=True)
class ServerSettings:
    """The server's limits; each refusal names the one it hit."""

    model_name: str = "slimm"
    api_key: str | None = None  # Bearer token every /v1 route asks for; None: open
    max_body_bytes: int = 20 * 2**20  # a request body, images included (base64)
    max_images: int = 8  # image parts per request, all messages together
    max_image_pixels: int = 4096 * 4096  # width x height of one image, checked before it is decoded
    allow_remote_images: bool = False  # fetch http(s) image URLs (off: no server-side request forgery)
    allowed_local_dir: str | None = None  # file:// URLs are read only inside it (None: never)
    max_video_frames: int = 32  # frames of one video: sampled from a file, or given as a list
    max_n: int = 8  # choices per request (`n`), each decoded in its own slot
    remote_image_timeout: float = 10.0  # seconds for one remote image
    request_timeout: float = 600.0  # seconds from submission to the last token
    visual_cache_mb: float = 256  # vision-encoder outputs kept by image content (0: off), per engine


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers


def error_body(status: int, message: str, type: str, param: str | None = None) -> dict[str, Any]:
    return P.ErrorResponse(
        error=P.ErrorDetail(message=message, type=type, param=param, code=str(status))
    ).model_dump()


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.type, e.param), e.status, headers=e.headers)


# ---- the request -> model inputs ----------------------------------------------------------------------------
def read_url(url: str, settings: ServerSettings, what: str, kind: str) -> bytes | Path:
    """A data:<kind>/...;base64 URL -> its bytes; an http(s) URL (when allowed) -> its bytes; a file://
    URL -> its path, only inside --allowed-local-dir."""
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not (header.startswith(f"data:{kind}/") and header.endswith(";base64")):
            raise ApiError(
                400, f"{what}: only data:{kind}/...;base64, URLs are accepted, got {header[:40]!r}"
            )
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, f"{what}: bad base64 data ({e})") from None
    if url.startswith(("http://", "https://")):
        if not settings.allow_remote_images:
            raise ApiError(
                400,
                f"{what}: remote {kind} URLs are not fetched by this server (started without "
                f"--allow-remote-images); send the {kind} inline as a data:{kind}/...;base64, URL",
            )
        return _download(url, settings, what)
    if url.startswith("file:"):
        return local_file(url, settings, what)
    raise ApiError(
        400, f"{what}: expected a data:{kind}/...;base64, URL (or an allowed file:// URL), got {url[:40]!r}"
    )


def local_file(url: str, settings: ServerSettings, what: str) -> Path:
    """The path of a file:// URL, resolved (symbolic links and '..' followed) and refused unless it
    lies inside the allowed directory; nothing about files outside it is revealed."""
    if settings.allowed_local_dir is None:
        raise ApiError(
            400,
            f"{what}: local files are not read by this server (start it with --allowed-local-dir DIR); "
            "send the file inline as a base64 data: URL",
        )
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
        raise ApiError(400, f"{what}: expected file:///absolute/path, got {url[:60]!r}")
    root = Path(settings.allowed_local_dir).resolve()
    path = Path(urllib.parse.unquote(parsed.path)).resolve()
    if not path.is_relative_to(root):
        raise ApiError(
            400, f"{what}: {url[:80]!r} is outside the directory this server reads (--allowed-local-dir)"
        )
    if not path.is_file():
        raise ApiError(400, f"{what}: {url[:80]!r} is not a file in the allowed directory")
    return path


def fetch_image(url: str, settings: ServerSettings, what: str):
    """An image URL (see read_url) -> RGB PIL image, its size checked before it is decoded."""
    from PIL import Image

    from slimm.processing import load_image

    raw = read_url(url, settings, what, "image")
    source = BytesIO(raw) if isinstance(raw, bytes) else raw
    try:
        with Image.open(source) as im:
            w, h = im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ApiError(400, f"{what}: cannot read it as an image ({e})") from None
    _check_pixels(w, h, settings, what)
    return load_image(raw if isinstance(raw, bytes) else str(raw), what)


def fetch_video(url: str, settings: ServerSettings, what: str) -> np.ndarray:
    """A video URL (see read_url) -> frames T x H x W x 3 uint8, sampled at 2 per second (Qwen's
    default) and at most --max-video-frames of them."""
    from slimm.processing.messages import read_video

    raw = read_url(url, settings, what, "video")
    ele = {"fps": 2.0, "max_frames": settings.max_video_frames}
    with tempfile.TemporaryDirectory(prefix="slimm-video-") as tmp:
        if isinstance(raw, bytes):  # PyAV reads files: the upload goes to a private temporary one
            path = Path(tmp) / "video"
            path.write_bytes(raw)
        else:
            path = raw
        try:
            frames = read_video({**ele, "video": str(path)})
        except SliMMError as e:
            raise ApiError(400, f"{what}: {str(e).replace(str(path), 'the video')}") from None
    _check_pixels(frames.shape[2], frames.shape[1], settings, what)
    return frames


def fetch_frames(urls: list[str], settings: ServerSettings, what: str) -> list:
    if len(urls) > settings.max_video_frames:
        raise ApiError(
            400,
            f"{what} has {len(urls)} frames; this server takes at most {settings.max_video_frames} a video",
        )
    return [fetch_image(u, settings, f"{what}[{k}]") for k, u in enumerate(urls)]


def _check_pixels(w: int, h: int, settings: ServerSettings, what: str) -> None:
    if w * h > settings.max_image_pixels:
        raise ApiError(
            400,
            f"{what} is {w}x{h} = {w * h} pixels; this server takes at most {settings.max_image_pixels} per image",
        )


def _download(url: str, settings: ServerSettings, what: str) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=settings.remote_image_timeout) as r:  # noqa: S310 - allowed by flag
            raw = r.read(settings.max_body_bytes + 1)
    except Exception as e:  # noqa: BLE001 - any network failure is the client's URL's problem here
        raise ApiError(400, f"{what}: could not fetch it ({type(e).__name__}: {e})") from None
    if len(raw) > settings.max_body_bytes:
        raise ApiError(400, f"{what}: larger than {settings.max_body_bytes} bytes")
    return raw


def sampling_params(body: P.ChatCompletionRequest, grammars=None) -> SamplingParams:
    """The request's sampling settings; its response_format compiled to a grammar (runs off the event
    loop: the first one builds the grammar library's tokenizer)."""
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if any(not s for s in stop):
        raise ApiError(400, "stop strings must not be empty", param="stop")
    return SamplingParams(
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's default
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(body.top_k or 0, 0),
        repetition_penalty=body.repetition_penalty or 1.0,
        seed=body.seed,
        stop=stop,
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs or 0,
        grammar=_grammar(body, grammars),
    )


def _grammar(body: P.ChatCompletionRequest, grammars) -> str | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema" and fmt.json_schema is None:
        raise ApiError(
            400, "response_format: type json_schema needs a json_schema object", param="response_format"
        )
    if grammars is None:
        raise ApiError(400, "response_format: the served model has no tokenizer", param="response_format")
    try:
        return grammars.compile(response_format_dict(fmt))
    except InputError as e:
        raise ApiError(400, str(e), param="response_format") from None


def model_inputs(body: P.ChatCompletionRequest, backend, settings: ServerSettings) -> dict[str, Any]:
    """Messages -> chat template text and images -> checked model inputs (runs off the event loop)."""
    if backend.processor is None:
        raise ApiError(500, "the served model has no tokenizer files", type="server_error")
    n_images = sum(
        not isinstance(p, P.TextPart) for m in body.messages if isinstance(m.content, list) for p in m.content
    )
    if n_images > settings.max_images:
        raise ApiError(
            400,
            f"the request holds {n_images} images and videos; this server takes at most {settings.max_images} "
            "per request",
            param="messages",
        )
    chat, images, videos = [], [], []
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        if m.content is None or isinstance(m.content, str):
            chat.append({"role": role, "content": m.content or ""})
            continue
        parts = []
        for j, part in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            if isinstance(part, P.TextPart):
                parts.append({"type": "text", "text": part.text})
            elif isinstance(part, P.ImagePart):
                images.append(fetch_image(part.image_url.url, settings, f"{where}.image_url"))
                parts.append({"type": "image"})
            elif isinstance(part, P.VideoURLPart):
                videos.append(fetch_video(part.video_url.url, settings, f"{where}.video_url"))
                parts.append({"type": "video"})
            else:
                videos.append(fetch_frames(part.video, settings, f"{where}.video"))
                parts.append({"type": "video"})
        chat.append({"role": role, "content": parts})
    text = backend.processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = backend.processor(text=[text], images=images or None, videos=videos or None)
    return normalize_inputs(inputs, backend.config)


# ---- the app -------------------------------------------------------------------------------------------------
class Guard:
    """ASGI middleware in front of everything: the API key, then the body size, both before a byte of
    the body is parsed (the body is read here, bounded, and handed on)."""

    def __init__(self, app, settings: ServerSettings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s = self.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if s.api_key is not None and scope["path"].startswith("/v1"):
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), s.api_key.encode()):
                return await _send_error(
                    send,
                    ApiError(
                        401,
                        "missing or wrong API key (Authorization: Bearer ...)",
                        "authentication_error",
                        headers={"WWW-Authenticate": "Bearer"},
                    ),
                )
        too_big = ApiError(
            413, f"the request body is larger than {s.max_body_bytes} bytes (--max-body-bytes)"
        )
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > s.max_body_bytes:
            return await _send_error(send, too_big)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > s.max_body_bytes:
                return await _send_error(send, too_big)
            if not msg.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then: the client's disconnect, seen by streaming responses

        return await self.app(scope, replay, send)


async def _send_error(send, e: ApiError) -> None:
    data = json.dumps(error_body(e.status, e.message, e.type, e.param)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (e.headers or {}).items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _field(loc) -> str:
    return ".".join(str(x) for x in loc if x != "body") or "body"


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    app = FastAPI(title="slimm serve", docs_url=None, redoc_url=None, openapi_url=None)
    name = settings.model_name

    # ---- every refusal in one place ----
    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(ValidationError)
    async def _invalid(request, e: ValidationError):
        errors = e.errors()
        first = errors[0]
        where = _field(first.get("loc", ()))
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        return error_response(ApiError(422, f"{where}: {first.get('msg')}{more}", param=where))

    @app.exception_handler(QueueFull)
    async def _full(request, e: QueueFull):
        return error_response(
            ApiError(
                429,
                f"the server is busy: {e}; retry shortly",
                "rate_limit_error",
                headers={"Retry-After": "1"},
            )
        )

    @app.exception_handler(EngineStopped)
    async def _stopped(request, e: EngineStopped):
        return error_response(ApiError(503, str(e), "server_error"))

    @app.exception_handler(SliMMError)
    async def _bad_input(request, e: SliMMError):
        return error_response(ApiError(400, str(e)))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.error("unhandled error on %s", request.url.path, exc_info=e)
        return error_response(ApiError(500, f"internal error ({type(e).__name__})", "server_error"))

    # ---- routes ----
    @app.get("/")
    async def page():
        # the chat page: one self-contained file shipped in the package (no CDN, works offline)
        return HTMLResponse(resources.files("slimm.serve").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/health")
    async def health():
        stats = engine.stats()
        return {"status": "ok", "model": name, **stats}

    @app.get("/metrics")
    async def metrics():
        s = engine.stats()
        visual = engine.visual_cache.stats() if engine.visual_cache is not None else None
        text = engine.metrics.render(s["waiting"], s["running"], s["max_batch"], visual)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return P.ModelList(data=[P.ModelCard(id=name, max_model_len=engine.capacity)]).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON body: {e}") from None
        body = P.ChatCompletionRequest.model_validate(data)
        if body.model is not None and body.model != name:
            raise ApiError(
                404,
                f"the model {body.model!r} does not exist here; this server serves {name!r}",
                "not_found_error",
                param="model",
            )
        params = await run_in_threadpool(sampling_params, body, engine.grammars)
        if body.n > settings.max_n:
            raise ApiError(
                400, f"n = {body.n}: this server answers with at most {settings.max_n} choices", param="n"
            )
        inputs = await run_in_threadpool(model_inputs, body, engine.backend, settings)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        reqs: list[EngineRequest] = []

        def emitter(index: int):
            def emit(ev) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (index, ev))
                except RuntimeError:  # the event loop is gone: nobody will read this answer
                    for r in reqs:
                        r.cancel()

            return emit

        try:
            # n choices: n requests of one prompt, each in its own slot; sampled ones draw from seed + i
            for i in range(body.n):
                seed = None if params.seed is None else (params.seed + i) % 2**63
                p = params if i == 0 else dataclasses.replace(params, seed=seed)
                reqs.append(engine.submit(EngineRequest(inputs, p, emitter(i))))
        except Exception:
            for r in reqs:
                r.cancel()
            raise
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        deadline = time.monotonic() + settings.request_timeout

        async def next_event():
            """(choice index, event); (None, Failed) past the deadline; (None, None) when the client left."""
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None, Failed(
                        504, f"the answer took longer than {settings.request_timeout:g} s (--request-timeout)"
                    )
                try:
                    return await asyncio.wait_for(events.get(), min(left, 1.0))
                except TimeoutError:
                    if not body.stream and await request.is_disconnected():
                        return None, None

        if body.stream:
            return StreamingResponse(
                _stream(reqs, rid, name, body, next_event),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        texts: list[list[str]] = [[] for _ in reqs]
        tokens: list[list] = [[] for _ in reqs]
        done: dict[int, Finished] = {}
        try:
            while len(done) < len(reqs):
                i, ev = await next_event()
                if ev is None:  # the client went away
                    raise ApiError(499, "client disconnected")
                if isinstance(ev, Delta):
                    texts[i].append(ev.text)
                    tokens[i] += ev.tokens
                elif isinstance(ev, Failed):
                    raise ApiError(
                        ev.status, ev.message, "server_error" if ev.status >= 500 else "invalid_request_error"
                    )
                elif isinstance(ev, Finished):
                    done[i] = ev
        finally:
            for r in reqs:
                r.cancel()  # a no-op once finished; frees the slot otherwise
        choices = [
            P.Choice(
                index=i,
                message=P.AssistantMessage(content="".join(texts[i])),
                finish_reason=done[i].reason,
                logprobs=_logprobs(tokens[i]) if body.logprobs else None,
            )
            for i in range(len(reqs))
        ]
        return P.ChatCompletion(id=rid, model=name, choices=choices, usage=_usage(done)).model_dump()

    app.add_middleware(Guard, settings=settings)
    return app


def _logprobs(tokens) -> P.ChoiceLogprobs:
    def top(t):
        return P.TopLogprob(token=t[1], logprob=t[2], bytes=list(t[1].encode()))

    return P.ChoiceLogprobs(
        content=[
            P.TokenLogprob(
                token=t.text,
                logprob=t.logprob,
                bytes=list(t.text.encode()),
                top_logprobs=[top(x) for x in t.top],
            )
            for t in tokens
        ]
    )


def _sse(obj) -> str:
    return f"data: {json.dumps(obj if isinstance(obj, dict) else obj.model_dump(exclude_none=True))}\n\n"


def _usage(done: dict[int, Finished]) -> P.Usage:
    # the prompt is counted once however many choices were drawn from it (as OpenAI does)
    prompt = next(iter(done.values())).prompt_tokens
    completion = sum(ev.completion_tokens for ev in done.values())
    return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _stream(reqs: list[EngineRequest], rid: str, name: str, body: P.ChatCompletionRequest, next_event):
    def chunk(index: int, delta: P.DeltaMessage, finish: str | None = None, logprobs=None) -> str:
        c = P.ChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)
        return _sse(P.ChatCompletionChunk(id=rid, model=name, choices=[c]))

    done: dict[int, Finished] = {}
    try:
        for i in range(len(reqs)):
            yield chunk(i, P.DeltaMessage(role="assistant", content=""))
        while len(done) < len(reqs):
            i, ev = await next_event()
            if isinstance(ev, Delta):
                logprobs = _logprobs(ev.tokens) if body.logprobs else None
                yield chunk(i, P.DeltaMessage(content=ev.text), logprobs=logprobs)
            elif isinstance(ev, Failed):
                kind = "server_error" if ev.status >= 500 else "invalid_request_error"
                yield _sse(error_body(ev.status, ev.message, kind))
                break
            elif isinstance(ev, Finished):
                done[i] = ev
                yield chunk(i, P.DeltaMessage(), finish=ev.reason)
        else:
            if body.stream_options is not None and body.stream_options.include_usage:
                yield _sse(P.ChatCompletionChunk(id=rid, model=name, choices=[], usage=_usage(done)))
        yield "data: [DONE]\n\n"
    finally:
        for r in reqs:
            r.cancel()  # the client went away mid-answer (or it is done): its slot is freed


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_server(
    model=None,
    backend: str = "torch",
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    max_queue: int = 64,
    max_seq_len: int | None = None,
    settings: ServerSettings | None = None,
    log_level: str = "info",
    **load_kwargs,
) -> None:
    """Load the model, start its engine, serve until interrupted (what `slimm serve` calls)."""
    import uvicorn

    import slimm
    from slimm.cache import demo_dir_for

    path = model or demo_dir_for(backend)
    loaded = slimm.load(path, backend=backend, **load_kwargs)
    if loaded.processor is None:
        raise InputError(f"{path}: no tokenizer files, so chat messages cannot be encoded")
    settings = settings or ServerSettings(model_name=str(path).rstrip("/").split("/")[-1])
    engine = Engine(
        loaded,
        max_batch=max_batch,
        max_queue=max_queue,
        capacity=max_seq_len,
        visual_cache_mb=settings.visual_cache_mb,
    )
    if settings.api_key is None and not is_loopback(host):
        log.warning("serving on %s without --api-key: anyone who reaches this address can use it", host)
    print(
        f"serving {settings.model_name!r} ({loaded.name}) on http://{host}:{port}/v1 — {max_batch} slots of "
        f"{engine.capacity} positions",
        flush=True,
    )
    try:
        uvicorn.run(create_app(engine, settings), host=host, port=port, log_level=log_level)
    finally:
        engine.stop()
