"""Joining or starting a Ray runtime: the one place that imports ray for `slimm batch` and `slimm serve
--ray`, names the extra to install when it is missing, and checks an address answers before Ray waits on it.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from slimm.errors import BackendUnavailable, InputError

RAY_EXTRA = 'pip install -e ".[ray]"'  # or, from PyPI: pip install "ray[data,serve]"
CONNECT_TIMEOUT = 5.0  # seconds to wait for a TCP answer from --ray-address before saying it is unreachable


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BackendUnavailable(
            f"Ray is not installed; this command runs on Ray Data / Ray Serve: {RAY_EXTRA}"
        ) from None
    return ray


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """HOST:PORT (or ray://HOST:PORT) must accept a TCP connection within `timeout` seconds. Ray itself
    retries an unreachable address for a minute or more; a typo should be an error in seconds."""
    where = address.removeprefix("ray://")
    host, sep, port = where.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InputError(f"--ray-address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        reason = "no answer" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise InputError(
            f"--ray-address {address}: cannot reach a Ray cluster there ({reason} within {timeout:g} s); "
            "start its head with `ray start --head` on that machine, or leave --ray-address out to run "
            "on a local Ray started here"
        ) from None


def connect(address: str | None = None, num_cpus: int | None = None) -> Any:
    """ray, initialised: already running in this process (kept as it is), the cluster at `address`
    (auto: the one `ray start` left on this machine), or a local runtime started in-process."""
    ray = import_ray()
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    if address not in (None, "auto"):
        check_reachable(address)  # a wrong address is an error even where this process runs Ray already
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address is None:
        # the embedded default: nothing to set up, and no dashboard to start on a small machine
        kwargs.update(include_dashboard=False, num_cpus=num_cpus)
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as e:
        raise InputError(
            f"--ray-address {address}: {e}. Start a cluster with `ray start --head`, or leave "
            "--ray-address out to run on a local Ray started here"
        ) from None
    return ray


def local_cpus(workers: int) -> int:
    """CPUs of the Ray runtime `slimm batch` / `slimm serve --ray` starts here: this machine's, plus
    one for the read stage or the Serve proxy, which mostly wait on the model workers."""
    return max(os.cpu_count() or 1, workers) + 1


def cluster_cpus(ray: Any) -> float:
    return float(ray.cluster_resources().get("CPU", 1.0))


def smallest_node_cpus(ray: Any) -> float:
    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return min((c for c in nodes if c > 0), default=1.0)


def read_cpus(ray: Any) -> float:
    """CPUs one read-stage task asks for: one, or half a small cluster."""
    return min(1.0, cluster_cpus(ray) / 2)


def cpus_per_worker(ray: Any, workers: int, reserved: float) -> float:
    """CPUs one model worker (a batch actor or a Serve replica) reserves, and the threads its framework
    runs (`threads_for`): the cluster's CPUs less `reserved` (the read stage's), split between the
    workers; whole CPUs, no more than the smallest machine has (a worker runs on one machine), where
    each gets one or more; a fraction where the cluster has fewer CPUs than workers. Reservation and
    threads agree, so workers on one machine do not run more threads than it has cores."""
    share = (cluster_cpus(ray) - reserved) / workers
    if share < 1:
        return share
    return float(min(int(share), max(1, int(smallest_node_cpus(ray)))))


def threads_for(worker_cpus: float) -> int:
    return max(1, int(worker_cpus))


def worker_share(
    ray: Any, workers: int, reserved: float, cpus: float | None, load_kwargs: dict
) -> tuple[float, int]:
    """(CPUs each worker reserves, threads it runs): `cpus` if given, else the caller's `threads`
    (load_kwargs), else cpus_per_worker; the threads are the caller's, else as many as the CPUs."""
    given = load_kwargs.get("threads")
    if cpus is None:
        cpus = float(given) if given else cpus_per_worker(ray, workers, reserved)
    return cpus, given or threads_for(cpus)


def set_threads(backend: str, threads: int | None, load_kwargs: dict) -> dict:
    """In a worker's process: torch's intra-op threads set here, the other backends' passed to
    slimm.load (unless the caller's `threads` is there already); slimm.load's keywords back."""
    load_kwargs = dict(load_kwargs)
    if threads is not None and backend == "torch":
        import torch

        torch.set_num_threads(threads)
    elif threads is not None:
        load_kwargs.setdefault("threads", threads)
    return load_kwargs
