"""What every backend shares: one validation of the model inputs (the same InputError on all of
them, before any framework runs), and one loaded model used by several threads at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prompts import CASES, IMG, make_inputs

from slimm.backends.base import normalize_inputs
from slimm.errors import InputError

pytest.importorskip("onnxruntime")

BACKENDS = ("torch", "onnx", "jax", "paddle", "mindspore")


@pytest.fixture(scope="module")
def backend(demo_dir, exported, converted):
    """backend(name) -> the plain demo model loaded with that backend, once per module."""
    import slimm

    made = {}

    def get(name):
        if name not in made:
            path = {"torch": lambda: demo_dir("plain"), "onnx": lambda: exported("plain")}.get(
                name, lambda: converted(name, "plain")
            )()
            made[name] = slimm.load(path, backend=name)
        return made[name]

    return get


def _set(key, fn):
    def change(x):
        x[key] = fn(x[key])
        return x

    return change


def _drop(*keys):
    def change(x):
        for k in keys:
            del x[k]
        return x

    return change


def _replace_image_tokens(count):
    def change(x):
        pos = np.argwhere(x["input_ids"] == IMG)[:count]
        x["input_ids"][tuple(pos.T)] = 100
        return x

    return change


def _put(key, index, value):
    def change(x):
        x[key] = x[key].astype(np.float32) if isinstance(value, float) else x[key]
        x[key][index] = value
        return x

    return change


# name -> (change to a valid one-image prompt, what the error says)
BAD = {
    "negative id": (_put("input_ids", (0, 4), -1), r"input_ids hold \[-1\]: token ids must be in 0\.\."),
    "id past vocab": (_put("input_ids", (0, 4), 10**6), r"input_ids hold \[1000000\]: token ids must be in"),
    "zero grid": (_set("image_grid_thw", lambda g: g * [[1, 0, 1]]), r"has a zero or negative size"),
    "grid and rows disagree": (
        _set("image_grid_thw", lambda g: np.array([[1, 4, 4]])),
        r"pixel_values has 24 patch rows but image_grid_thw \[\[1, 4, 4\]\] describes 16",
    ),
    "rows too narrow": (
        _set("pixel_values", lambda p: p[:, :-1]),
        r"pixel_values rows have \d+ values; this model takes",
    ),
    "rows missing": (_set("pixel_values", lambda p: p[:-2]), r"has 22 patch rows but image_grid_thw"),
    "odd grid": (
        _set("image_grid_thw", lambda g: np.array([[1, 3, 8]])),
        r"heights and widths must be multiples of 2",
    ),
    "pad tokens, no pixels": (
        _drop("pixel_values", "image_grid_thw"),
        r"holds 6 <\|image_pad\|> tokens but no images",
    ),
    "pixels, no pad tokens": (
        _replace_image_tokens(6),
        r"holds 0 <\|image_pad\|> tokens but the images give 6",
    ),
    "pad count mismatch": (_replace_image_tokens(1), r"holds 5 <\|image_pad\|> tokens but the images give 6"),
    "nan pixel": (_put("pixel_values", (3, 5), float("nan")), r"pixel_values holds NaN or infinite values"),
    "inf pixel": (_put("pixel_values", (0, 0), float("inf")), r"pixel_values holds NaN or infinite values"),
    "all-zero mask row": (
        _set("attention_mask", lambda m: m * 0),
        r"attention_mask row\(s\) \[0\] are all 0",
    ),
    "mask value 2": (_put("attention_mask", (0, 3), 2), r"attention_mask must hold 0 and 1 only"),
    "grid without pixels": (_drop("pixel_values"), r"image_grid_thw given without pixel_values"),
}


@pytest.mark.parametrize("name", BACKENDS)
def test_bad_inputs_are_one_input_error_on_every_backend(backend, name):
    model = backend(name)
    good = make_inputs(model.config, CASES["image"], seed=3)
    assert (
        model.generate(**good, max_new_tokens=2, eos_token_id=[]).shape[1] == good["input_ids"].shape[1] + 2
    )
    for case, (change, message) in BAD.items():
        bad = change({k: v.copy() for k, v in good.items()})
        with pytest.raises(InputError, match=message) as got:
            model.generate(**bad, max_new_tokens=2, eos_token_id=[])
        # raised by the shared layer, so word for word what it says for this input
        with pytest.raises(InputError) as shared:
            normalize_inputs({k: v.copy() for k, v in bad.items()}, model.config)
        assert str(got.value) == str(shared.value), f"{name}, {case}"


@pytest.mark.parametrize("name", BACKENDS)
def test_one_model_shared_by_four_threads(backend, name):
    """Mixed prompts (text, images, video, a batch of two) from 4 threads at once on one loaded
    model give exactly the answers each gives alone."""
    model = backend(name)
    cases = ["image", "text", "batch2", "video", "two_images", "image", "text", "batch2"]
    jobs = [make_inputs(model.config, CASES[c], seed=i) for i, c in enumerate(cases)]

    def run(inputs):
        return model.generate(**inputs, max_new_tokens=10, eos_token_id=[])

    alone = [run(j) for j in jobs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, jobs * 2))
    for i, (got, want) in enumerate(zip(together, alone * 2, strict=True)):
        np.testing.assert_array_equal(got, want, err_msg=f"{name}: job {i} ({cases[i % len(cases)]})")
