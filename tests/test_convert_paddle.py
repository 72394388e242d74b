"""Paddle target end to end: every part of tiny exports of all four variants converted, traced with
dynamic dims, saved with paddle.jit.save, run by Paddle Inference's predictor at several input shapes
against ONNX Runtime on the same ONNX file; every per-op case through the saved program too; the
artifact loads with onnx / onnxruntime / torch unimportable; broken artifacts are clear errors.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from slimm.convert import generate_source, import_generated  # noqa: E402
from slimm.convert.paddle import TARGET  # noqa: E402
from slimm.errors import CheckpointError  # noqa: E402
from slimm.manifest import PARTS, part_file  # noqa: E402
from slimm.vision_index import vision_host_inputs  # noqa: E402

VARIANTS = ("plain", "v1", "midlayers", "efficient")
# batch, sequence, cache capacity, visual tokens and B's image grids (two images and a two-frame
# video in the second: B's attention stays within each frame)
SHAPES = (
    {"batch": 1, "seq": 5, "capacity": 8, "visual_tokens": 3, "grids": [(1, 4, 6)]},
    {"batch": 2, "seq": 11, "capacity": 16, "visual_tokens": 7, "grids": [(1, 8, 4), (2, 4, 4)]},
)
# a decode step: one token, no visual tokens (zero-size deepstack and visual_pos)
DECODE = {"batch": 2, "seq": 1, "capacity": 16, "visual_tokens": 0}


def io_names(manifest: dict, part: str) -> list[tuple[str, str, list]]:
    """(name, dtype, dims with None for dynamic) of a part's inputs, as `save` wants them."""
    return [
        (t["name"], t["dtype"], [d if isinstance(d, int) else None for d in t["dims"]])
        for t in manifest["parts"][part]["inputs"]
    ]


@pytest.fixture(scope="session")
def converted(demo_dir, tmp_path_factory):
    """converted(variant) -> (ONNX export dir, Paddle artifact dir, manifest); each part converted once."""
    pytest.importorskip("torch")
    from slimm.export import export_model

    made = {}

    def get(variant: str):
        if variant not in made:
            onnx_dir = export_model(
                demo_dir(variant), tmp_path_factory.mktemp(f"onnx-{variant}"), max_seq_len=64, progress=False
            )
            manifest = json.loads((onnx_dir / "manifest.json").read_text())
            out = tmp_path_factory.mktemp(f"paddle-{variant}")
            for part in PARTS:
                src, prog = generate_source(onnx_dir / part_file(part), "paddle")
                gen = out / f"gen_{part}.py"
                gen.write_text(src)
                inputs = io_names(manifest, part)
                assert [v.name for v in prog.inputs] == [name for name, _, _ in inputs]
                files = TARGET.save(import_generated(gen), prog.weights, inputs, out, f"SliMM_{part}")
                assert files == [f"SliMM_{part}.json", f"SliMM_{part}.pdiparams"]
            made[variant] = (onnx_dir, out, manifest)
        return made[variant]

    return get


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


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)) if ref.size else 0.0


def check(got: list, ref: list, names: list[str], what: str) -> None:
    assert len(got) == len(ref), what
    for g, r, name in zip(got, ref, names, strict=True):
        assert g.shape == r.shape, f"{what} {name}: shape {g.shape} != {r.shape}"
        if r.dtype.kind == "f":
            assert g.dtype == r.dtype, f"{what} {name}: dtype {g.dtype} != {r.dtype}"
            assert rel_err(g, r) <= 1e-5, f"{what} {name}: relative error {rel_err(g, r):.2e}"
        else:
            np.testing.assert_array_equal(g, r, err_msg=f"{what} {name}")


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_part_matches_onnxruntime_at_two_shapes(converted, variant, part):
    onnx_dir, out, manifest = converted(variant)
    run = TARGET.load(out, f"SliMM_{part}")
    sess = ort.InferenceSession(str(onnx_dir / part_file(part)), providers=["CPUExecutionProvider"])
    names = [name for name, _, _ in io_names(manifest, part)]
    out_names = [t["name"] for t in manifest["parts"][part]["outputs"]]
    shapes = SHAPES + ((DECODE,) if part in ("C", "F") else ())
    for k, shape in enumerate(shapes):  # one predictor, new shapes: the dims really are dynamic
        feeds = make_feeds(manifest, part, shape, np.random.default_rng(k))
        got = run(*(feeds[n] for n in names))
        check(got, sess.run(None, feeds), out_names, f"{variant} {part} shape {k}")


def test_onednn_and_jit_load_give_the_same_results(converted):
    onnx_dir, out, manifest = converted("v1")
    names = [name for name, _, _ in io_names(manifest, "F")]
    feeds = make_feeds(manifest, "F", SHAPES[1], np.random.default_rng(3))
    ref = ort.InferenceSession(str(onnx_dir / part_file("F")), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )
    out_names = [t["name"] for t in manifest["parts"]["F"]["outputs"]]
    for what, run in (
        ("oneDNN", TARGET.load(out, "SliMM_F", threads=2, onednn=True)),
        ("jit.load", TARGET.load_layer(out, "SliMM_F")),
    ):
        check(run(*(feeds[n] for n in names)), ref, out_names, what)


def test_every_op_case_through_the_saved_program(tmp_path):
    """The per-op cases with every input size dynamic, traced and run by the predictor: run-time
    sizes are 0-d tensors there, not the ints the eager per-op test sees."""
    from test_convert_ops import CASES

    for i, case in enumerate(CASES):
        if case.op not in TARGET.registry.handlers:
            continue
        model = case.model()
        path = tmp_path / f"{i}.onnx"
        onnx.save(model, str(path))
        src, prog = generate_source(path, "paddle")
        gen = tmp_path / f"gen_{i}.py"
        gen.write_text(src)
        feeds = case.feeds()
        inputs = [(v.name, v.dtype, [None] * len(v.shape)) for v in prog.inputs]
        if case.op == "ScatterND":  # the index tuple's length is fixed, as in the exports
            inputs[1][2][-1] = feeds["x1"].shape[-1]
        TARGET.save(import_generated(gen), prog.weights, inputs, tmp_path, f"case{i}")
        got = TARGET.load(tmp_path, f"case{i}")(*(feeds[v.name] for v in prog.inputs))
        ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, feeds
        )
        check(got, ref, [f"y{k}" for k in range(len(ref))], case.name)


def test_scatter_nd_with_a_dynamic_index_length_is_a_clear_error_when_traced(tmp_path):
    from test_convert_ops import CASES

    case = next(c for c in CASES if c.op == "ScatterND")
    path = tmp_path / "m.onnx"
    onnx.save(case.model(), str(path))
    src, prog = generate_source(path, "paddle")
    (tmp_path / "gen.py").write_text(src)
    inputs = [(v.name, v.dtype, [None] * len(v.shape)) for v in prog.inputs]
    with pytest.raises(ValueError, match="index's last size must be fixed"):
        TARGET.save(import_generated(tmp_path / "gen.py"), prog.weights, inputs, tmp_path, "m")


# The load path as the runtime backend uses it, in a fresh interpreter where importing onnx,
# onnxruntime or torch fails: the artifact must not need them.
LOAD_WITHOUT_CONVERTER = """
import sys
for name in ("onnx", "onnxruntime", "torch"):
    sys.modules[name] = None  # `import name` now raises ImportError
import numpy as np
from slimm.convert.paddle import TARGET
feeds = np.load(sys.argv[1])
run = TARGET.load(sys.argv[2], "SliMM_F", threads=1)
got = run(*(feeds[f"in{i}"] for i in range(len(feeds.files))))
np.savez(sys.argv[3], *got)
"""


def test_artifact_loads_without_onnx_onnxruntime_torch(converted, tmp_path):
    onnx_dir, out, manifest = converted("v1")
    names = [name for name, _, _ in io_names(manifest, "F")]
    feeds = make_feeds(manifest, "F", SHAPES[1], np.random.default_rng(5))
    np.savez(tmp_path / "in.npz", **{f"in{i}": feeds[n] for i, n in enumerate(names)})
    args = [str(tmp_path / "in.npz"), str(out), str(tmp_path / "out.npz")]
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_CONVERTER, *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = np.load(tmp_path / "out.npz")
    got = [res[f"arr_{i}"] for i in range(len(res.files))]
    sess = ort.InferenceSession(str(onnx_dir / part_file("F")), providers=["CPUExecutionProvider"])
    check(got, sess.run(None, feeds), [t["name"] for t in manifest["parts"]["F"]["outputs"]], "subprocess F")


BROKEN = {
    "program-missing": ("SliMM_B.json", None),
    "weights-missing": ("SliMM_B.pdiparams", None),
    "program-empty": ("SliMM_B.json", b""),
    "program-garbage": ("SliMM_B.json", b"\x00\x01 not a program"),
    "program-truncated": ("SliMM_B.json", "half"),
    "weights-truncated": ("SliMM_B.pdiparams", "half"),
    "weights-empty": ("SliMM_B.pdiparams", b""),
    "weights-random": ("SliMM_B.pdiparams", "random"),
    "weights-of-another-part": ("SliMM_B.pdiparams", "SliMM_F.pdiparams"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_artifact_is_a_checkpoint_error_naming_the_file(converted, tmp_path, case):
    _, out, _ = converted("plain")
    for f in ("SliMM_B.json", "SliMM_B.pdiparams"):
        shutil.copyfile(out / f, tmp_path / f)
    name, content = BROKEN[case]
    path = tmp_path / name
    if content is None:
        path.unlink()
    else:
        if content == "half":
            content = (out / name).read_bytes()[: path.stat().st_size // 2]
        elif content == "random":
            content = np.random.default_rng(0).bytes(path.stat().st_size)
        elif isinstance(content, str):
            content = (out / content).read_bytes()
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path).replace(".", r"\.")):
        TARGET.load(tmp_path, "SliMM_B")


def test_missing_directory_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="directory not found"):
        TARGET.load(tmp_path / "nowhere", "SliMM_F")


def test_wrong_number_of_inputs_names_the_program_inputs(converted):
    _, out, _ = converted("plain")
    run = TARGET.load(out, "SliMM_E")
    with pytest.raises(ValueError, match="position_ids"):
        run()
