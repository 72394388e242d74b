"""Shared by the Ray tests: one small local Ray runtime for the whole folder (2 CPUs, a 200 MB object
store, no dashboard), the demo ONNX model, a folder of images of several sizes and their answers from
the backend run row by row (what `slimm generate` prints)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from batch_helpers import BACKEND, SIZES, generate_answer

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")


@pytest.fixture(scope="session")
def ray_runtime():
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, logging_level="WARNING")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """The runtime stops after this folder's last test, not at the end of the session: its raylet
    would otherwise run beside every later test, taking CPU and writing its own warnings (a full
    disk, say) into the stderr those tests read."""
    result = yield
    here = Path(__file__).parent
    if (nextitem is None or here not in nextitem.path.parents) and ray.is_initialized():
        ray.shutdown()
    return result


@pytest.fixture(scope="session")
def model():
    import slimm
    from slimm.cache import demo_dir_for

    return slimm.load(demo_dir_for(BACKEND), backend=BACKEND)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """24 PNG images, 8 sizes, in a folder and two subfolders: {id (path inside the folder): path}."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    made = {}
    for i in range(24):
        h, w = SIZES[i % len(SIZES)]
        rel = ["", "a/", "a/b/"][i % 3] + f"img{i:02d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / rel)
        made[rel] = root / rel
    return root, made


@pytest.fixture(scope="session")
def expected(model, images):
    """{id: answer} of every image, row by row."""
    return {rid: generate_answer(model, path) for rid, path in images[1].items()}
