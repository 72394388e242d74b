"""Helpers of the server tests: a real uvicorn server on 127.0.0.1 and a free port, in a thread,
stopped on exit; inline test images."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time

import numpy as np


@contextlib.contextmanager
def running_server(
    backend,
    max_batch: int = 4,
    max_queue: int = 16,
    capacity: int = 256,
    visual_cache_mb: float = 256,
    **settings,
):
    """(base URL, engine) of a server on a free port; stopped on exit."""
    import uvicorn

    from slimm.serve.app import ServerSettings, create_app
    from slimm.serve.engine import Engine

    engine = Engine(
        backend, max_batch=max_batch, max_queue=max_queue, capacity=capacity, visual_cache_mb=visual_cache_mb
    )
    app = create_app(engine, ServerSettings(model_name="demo", **settings))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < end, "the server did not start within 30 s"
            assert thread.is_alive(), "the server thread died while starting"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(15)
        engine.stop()
        sock.close()


def image_url(w: int, h: int, seed: int = 0, fmt: str = "PNG") -> str:
    """A data:image/...;base64 URL of a w x h noise image."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(w: int, h: int, seed: int = 0) -> dict:
    return {"type": "image_url", "image_url": {"url": image_url(w, h, seed)}}
