"""`slimm serve --ray`: the same OpenAI-compatible app (slimm.serve.app) deployed on Ray Serve, one
model and one continuous-batching Engine per replica; Ray Serve's proxy spreads requests across them
and replaces a replica whose process dies.
"""

from __future__ import annotations

import os
from typing import Any

from slimm.serve.app import ServerSettings, create_app, is_loopback

APP_NAME = "slimm"
REPLICA_HEADER = "x-slimm-replica"  # which replica answered: the process id of its engine


class Replica:
    """One replica: the model loaded and its engine started in the constructor, then the app built on
    them (Ray Serve calls `__serve_build_asgi_app__` after the constructor, in the replica's process)."""

    def __init__(
        self,
        model: str | None,
        backend: str,
        max_batch: int,
        max_queue: int,
        max_seq_len: int | None,
        settings: ServerSettings,
        load_kwargs: dict,
        threads: int | None = None,
    ) -> None:
        import slimm
        from slimm.batch.cluster import set_threads
        from slimm.batch.pipeline import model_path
        from slimm.errors import InputError
        from slimm.serve.engine import Engine

        # resolved here, on the replica's machine: a hub id downloads to its cache, the demo is built there
        path = model_path(model, backend)
        loaded = slimm.load(path, backend=backend, **set_threads(backend, threads, load_kwargs))
        if loaded.processor is None:
            raise InputError(f"{path}: no tokenizer files, so chat messages cannot be encoded")
        self.engine = Engine(
            loaded,
            max_batch=max_batch,
            max_queue=max_queue,
            capacity=max_seq_len,
            visual_cache_mb=settings.visual_cache_mb,
        )
        self.settings = settings

    def __serve_build_asgi_app__(self):
        return ReplicaHeader(create_app(self.engine, self.settings), str(os.getpid()))

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


class ReplicaHeader:
    """ASGI middleware: every response names the replica that made it (load spreading is visible)."""

    def __init__(self, app, replica: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        return await self.app(scope, receive, send_named)


def deployment(
    model: str | None = None,
    backend: str = "torch",
    max_batch: int = 8,
    max_queue: int = 64,
    max_seq_len: int | None = None,
    settings: ServerSettings | None = None,
    *,
    replicas: int = 1,
    replica_cpus: float | None = None,
    **load_kwargs,
) -> Any:
    """The bound Ray Serve application: `replicas` copies of Replica, each taking up to max_batch +
    max_queue requests, as `slimm serve` does (more get the engine's 429). Each replica reserves
    `replica_cpus` (default: the cluster's CPUs less one for the proxy and other work, split between
    the replicas, as `slimm batch` splits them between its workers) and runs that many framework
    threads unless `threads` is given."""
    from ray import serve

    from slimm.batch.cluster import import_ray, read_cpus, worker_share
    from slimm.errors import InputError

    if not (isinstance(replicas, int) and replicas >= 1):
        raise InputError(f"--replicas must be an integer >= 1, got {replicas!r}")
    ray = import_ray()
    replica_cpus, threads = worker_share(ray, replicas, read_cpus(ray), replica_cpus, load_kwargs)
    cls = serve.deployment(
        serve.ingress()(Replica),
        name="slimm",
        num_replicas=replicas,
        max_ongoing_requests=max_batch + max_queue,
        ray_actor_options={"num_cpus": replica_cpus},
        health_check_period_s=2,
        health_check_timeout_s=30,
    )
    settings = settings or ServerSettings()
    return cls.bind(model, backend, max_batch, max_queue, max_seq_len, settings, load_kwargs, threads)


def start(
    model: str | None = None,
    backend: str = "torch",
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    max_queue: int = 64,
    max_seq_len: int | None = None,
    settings: ServerSettings | None = None,
    *,
    replicas: int = 1,
    ray_address: str | None = None,
    serve_forever: bool = False,
    **load_kwargs,
) -> None:
    """Deploy on Ray Serve (a local Ray unless `ray_address`) and return once every replica is up;
    with `serve_forever` (what `slimm serve --ray` does), serve until interrupted, then take the app
    down."""
    import logging
    import time

    from slimm.batch.cluster import connect, import_ray, local_cpus
    from slimm.batch.pipeline import model_path

    import_ray()  # which extra to install, before a model is built
    settings = settings or ServerSettings()
    if settings.api_key is None and not is_loopback(host):
        logging.getLogger("slimm.serve").warning(
            "serving on %s without --api-key: anyone who reaches this address can use it", host
        )
    model_path(model, backend)  # a missing model is an error now, not in every replica
    connect(ray_address, num_cpus=local_cpus(replicas))
    from ray import serve

    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": logging.WARNING})
    app = deployment(
        model, backend, max_batch, max_queue, max_seq_len, settings, replicas=replicas, **load_kwargs
    )
    serve.run(app, name=APP_NAME, route_prefix="/")
    if not serve_forever:
        return
    print(
        f"serving {settings.model_name!r} on Ray Serve at http://{host}:{port}/v1 — {replicas} replicas of "
        f"{max_batch} slots (Ctrl-C stops it)",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.delete(APP_NAME)
