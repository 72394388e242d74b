"""Shared by the converter tests: running a converted model (eagerly, or saved and reloaded) next to
ONNX Runtime, one comparison rule, and valid inputs for each exported part at chosen sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prompts import rel_err

from slimm.host.vision_index import vision_host_inputs

TOL = 1e-5  # max relative error of float outputs against ONNX Runtime
# batch, sequence, cache capacity, visual tokens and B's image grids (two images and a two-frame
# video in the second: B's attention stays within each frame)
SHAPES = (
    {"batch": 1, "seq": 5, "capacity": 8, "visual_tokens": 3, "grids": [(1, 4, 6)]},
    {"batch": 2, "seq": 11, "capacity": 16, "visual_tokens": 7, "grids": [(1, 8, 4), (2, 4, 4)]},
)
# a decode step: one token, no visual tokens (zero-size deepstack and visual_pos)
DECODE = {"batch": 2, "seq": 1, "capacity": 16, "visual_tokens": 0}
# each target's files of one saved part
ARTIFACT_FILES = {
    "jax": (".jaxexport", ".safetensors"),
    "paddle": (".json", ".pdiparams"),
    "mindspore": (".mindir",),
}


def check(got: list, ref: list, what: str, names: list[str] | None = None) -> None:
    """Same count, shapes and dtypes; floats within TOL relative to the reference's largest value,
    everything else exact."""
    assert len(got) == len(ref), f"{what}: {len(got)} outputs, expected {len(ref)}"
    for k, (g, r) in enumerate(zip(got, ref, strict=True)):
        g, r = np.asarray(g), np.asarray(r)
        where = f"{what} {names[k] if names else k}"
        assert g.shape == r.shape, f"{where}: shape {g.shape} != {r.shape}"
        if r.dtype.kind == "f":
            assert g.dtype == r.dtype, f"{where}: dtype {g.dtype} != {r.dtype}"
            err = rel_err(g, r) if r.size else 0.0
            assert err <= TOL, f"{where}: relative error {err:.2e}"
        else:
            assert g.dtype.kind == r.dtype.kind, f"{where}: dtype {g.dtype} != {r.dtype}"
            np.testing.assert_array_equal(g, r, err_msg=where)


def ort_run(model, feeds: dict) -> list[np.ndarray]:
    """An ONNX model (proto or path) run by ONNX Runtime on the CPU."""
    import onnxruntime as ort

    src = str(model) if isinstance(model, str | Path) else model.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)


def generated(target: str, model, tmp_path: Path, tag: str = "m", name: str | None = None):
    """(imported generated module, folded program) of an ONNX model for `target`; `name` is the
    part name the module is generated under (the file's stem by default)."""
    import onnx

    from slimm.convert import generate_source, import_generated

    path = tmp_path / f"{tag}.onnx"
    onnx.save(model, str(path))
    src, prog = generate_source(path, target, name=name)
    gen = tmp_path / f"gen_{tag}_{target}.py"
    gen.write_text(src)
    return import_generated(gen), prog


def run_target(target: str, model, feeds: dict, tmp_path: Path) -> list[np.ndarray]:
    """The model converted and run eagerly (NumPy in, NumPy out)."""
    from slimm.convert import get_target

    module, prog = generated(target, model, tmp_path)
    return get_target(target).runner(module, prog.weights)(*[feeds[v.name] for v in prog.inputs])


def run_saved(
    target: str, model, feed_sets: list[dict], tmp_path: Path, tag: str = "m", name: str | None = None
) -> list[list]:
    """The model converted, saved with every input size dynamic, reloaded through the target's runtime
    and run on each feed set (NumPy outputs)."""
    from slimm.convert import get_runtime, get_target

    module, prog = generated(target, model, tmp_path, tag, name)
    tgt = get_target(target)

    def dims(v):  # each size the ONNX input leaves open stays open: None, or its name for jax
        names = v.dim_names or (None,) * len(v.shape)
        return [
            d if isinstance(d, int) else (names[i] or d.code) if tgt.symbolic_dims else None
            for i, d in enumerate(v.shape)
        ]

    inputs = [(v.name, feed_sets[0][v.name].dtype.name, dims(v)) for v in prog.inputs]
    tgt.save(module, prog.weights, inputs, tmp_path, tag)
    rt = get_runtime(target)
    run = rt.load(tmp_path, tag)
    return [[rt.to_numpy(o) for o in run(*(f[v.name] for v in prog.inputs))] for f in feed_sets]


def io_names(manifest: dict, part: str) -> list[tuple[str, str, list]]:
    """(name, dtype, dims with None for dynamic) of a part's inputs, as `Target.save` wants them."""
    return [
        (t["name"], t["dtype"], [d if isinstance(d, int) else None for d in t["dims"]])
        for t in manifest["parts"][part]["inputs"]
    ]


def output_names(manifest: dict, part: str) -> list[str]:
    return [t["name"] for t in manifest["parts"][part]["outputs"]]


def make_feeds(manifest: dict, part: str, shape: dict, rng) -> dict[str, np.ndarray]:
    """Inputs of one part at one shape, valid for what they mean (ids in range, masks, positions)."""
    model = manifest["model"]
    B, S = shape["batch"], shape["seq"]
    if part == "B":
        spec = manifest["parts"]["B"]["inputs"][0]
        rows = sum(int(np.prod(g)) for g in shape["grids"])
        host = vision_host_inputs(model["deepstack_type"], model["spatial_merge_size"], shape["grids"])
        return {"pixel_values": rng.standard_normal((rows, spec["dims"][1])).astype(np.float32), **host}
    feeds = {}
    for t in manifest["parts"][part]["inputs"]:
        name, dims = t["name"], [d if isinstance(d, int) else shape[d] for d in t["dims"]]
        if name == "input_ids":
            feeds[name] = rng.integers(0, model["text"]["vocab_size"], dims).astype(np.int64)
        elif name == "visual_pos":  # distinct flat positions b*seq+s
            feeds[name] = np.sort(rng.choice(B * S, dims[0], replace=False)).astype(np.int64)
        elif name == "position_ids":
            feeds[name] = rng.integers(0, 300, dims).astype(np.int64)
        elif name == "past_mask":  # half-filled cache, one hole in the last row
            mask = np.zeros(dims, np.int64)
            mask[:, : dims[1] // 2] = 1
            mask[-1, 0] = 0
            feeds[name] = mask
        elif name == "cur_mask":  # left padding in the last row of a batch
            mask = np.ones(dims, np.int64)
            if B > 1 and S > 2:
                mask[-1, :2] = 0
            feeds[name] = mask
        else:
            assert t["dtype"] == "float32", t
            feeds[name] = rng.standard_normal(dims).astype(np.float32)
    return feeds
