"""Fixtures of the server tests: the tiny torch demo model, a server over it, an `openai` client."""

from __future__ import annotations

import pytest
from serve_helpers import running_server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")


@pytest.fixture(scope="session")
def torch_demo(demo_dir):
    import slimm

    return slimm.load(demo_dir("plain"), backend="torch")


@pytest.fixture(scope="module")
def server(torch_demo):
    with running_server(torch_demo) as s:
        yield s


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key="unused", timeout=60, max_retries=0)
