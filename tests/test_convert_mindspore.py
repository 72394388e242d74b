"""MindSpore target end to end: every part of tiny exports of all four variants converted, saved as
MINDIR with dynamic dims, reloaded as `nn.GraphCell` and run at two input shapes against ONNX Runtime
on the same ONNX file; the artifact loads with onnx / onnxruntime / torch unimportable; broken
.mindir files are clear errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from slimm.convert import generate_source, import_generated  # noqa: E402
from slimm.convert.mindspore import TARGET  # noqa: E402
from slimm.errors import CheckpointError  # noqa: E402
from slimm.manifest import PARTS, part_file  # noqa: E402
from slimm.vision_index import vision_host_inputs  # noqa: E402

VARIANTS = ("plain", "v1", "midlayers", "efficient")
# two shapes per part: batch, sequence, cache capacity, visual tokens, and the image grids of B
# (two images in the second: B's block-diagonal attention across frames)
SHAPES = (
    {"batch": 1, "seq": 5, "capacity": 8, "visual_tokens": 3, "grids": [(1, 4, 6)]},
    {"batch": 2, "seq": 11, "capacity": 16, "visual_tokens": 7, "grids": [(1, 4, 6), (1, 6, 4)]},
)


def io_names(manifest: dict, part: str) -> list[tuple[str, str, list]]:
    """(name, dtype, dims with None for dynamic) of a part's inputs, as `save` wants them."""
    return [
        (t["name"], t["dtype"], [d if isinstance(d, int) else None for d in t["dims"]])
        for t in manifest["parts"][part]["inputs"]
    ]


@pytest.fixture(scope="session")
def converted(demo_dir, tmp_path_factory):
    """converted(variant) -> (ONNX export dir, MINDIR dir, manifest); every part converted once."""
    from slimm.export import export_model

    made = {}

    def get(variant: str):
        if variant not in made:
            onnx_dir = export_model(
                demo_dir(variant), tmp_path_factory.mktemp(f"onnx-{variant}"), max_seq_len=64, progress=False
            )
            manifest = json.loads((onnx_dir / "manifest.json").read_text())
            out = tmp_path_factory.mktemp(f"mindir-{variant}")
            for part in PARTS:
                src, prog = generate_source(onnx_dir / part_file(part), "mindspore")
                gen = out / f"gen_{part}.py"
                gen.write_text(src)
                inputs = io_names(manifest, part)
                assert [v.name for v in prog.inputs] == [name for name, _, _ in inputs]
                files = TARGET.save(import_generated(gen), prog.weights, inputs, out, f"SliMM_{part}")
                assert files == [f"SliMM_{part}.mindir"]
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
            if B > 1:
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
def test_mindir_part_matches_onnxruntime_at_two_shapes(converted, variant, part):
    onnx_dir, out, manifest = converted(variant)
    run = TARGET.load(out, f"SliMM_{part}")
    sess = ort.InferenceSession(str(onnx_dir / part_file(part)), providers=["CPUExecutionProvider"])
    names = [name for name, _, _ in io_names(manifest, part)]
    out_names = [t["name"] for t in manifest["parts"][part]["outputs"]]
    for k, shape in enumerate(SHAPES):  # one GraphCell, new shapes: the dims really are dynamic
        feeds = make_feeds(manifest, part, shape, np.random.default_rng(k))
        got = run(*(feeds[n] for n in names))
        check(got, sess.run(None, feeds), out_names, f"{variant} {part} shape {k}")


# The load path as the runtime backend uses it, in a fresh interpreter where importing onnx,
# onnxruntime or torch fails: the artifact must not need them.
LOAD_WITHOUT_CONVERTER = """
import sys
for name in ("onnx", "onnxruntime", "torch"):
    sys.modules[name] = None  # `import name` now raises ImportError
import numpy as np
from slimm.convert.mindspore import TARGET
feeds = np.load(sys.argv[1])
run = TARGET.load(sys.argv[2], "SliMM_F")
got = run(*(feeds[f"in{i}"] for i in range(len(feeds.files))))
np.savez(sys.argv[3], *got)
"""


def test_mindir_loads_without_onnx_onnxruntime_torch(converted, tmp_path):
    onnx_dir, out, manifest = converted("v1")
    names = [name for name, _, _ in io_names(manifest, "F")]
    feeds = make_feeds(manifest, "F", SHAPES[1], np.random.default_rng(5))
    np.savez(tmp_path / "in.npz", **{f"in{i}": feeds[n] for i, n in enumerate(names)})
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_WITHOUT_CONVERTER,
            str(tmp_path / "in.npz"),
            str(out),
            str(tmp_path / "out.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # MindSpore writes rank_0/ debug dumps into the working directory on failures
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = np.load(tmp_path / "out.npz")
    got = [res[f"arr_{i}"] for i in range(len(res.files))]
    sess = ort.InferenceSession(str(onnx_dir / part_file("F")), providers=["CPUExecutionProvider"])
    check(got, sess.run(None, feeds), [t["name"] for t in manifest["parts"]["F"]["outputs"]], "subprocess F")


@pytest.mark.parametrize(
    "content",
    [None, b"", b"not a model\n", "truncated", "random"],
    ids=["missing", "empty", "text", "truncated", "random"],
)
def test_broken_mindir_is_a_checkpoint_error_naming_the_file(converted, tmp_path, content):
    _, out, _ = converted("plain")
    path = tmp_path / "SliMM_E.mindir"
    if content == "truncated":
        content = (out / "SliMM_E.mindir").read_bytes()[:3000]
    elif content == "random":
        content = np.random.default_rng(0).bytes(4096)
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path).replace(".", r"\.")):
        TARGET.load(tmp_path, "SliMM_E")


def test_save_replaces_an_older_artifact_and_leaves_files_readable(converted, tmp_path):
    onnx_dir, _, manifest = converted("plain")
    src, prog = generate_source(onnx_dir / part_file("E"), "mindspore")
    gen = tmp_path / "gen_E.py"
    gen.write_text(src)
    module = import_generated(gen)
    (tmp_path / "SliMM_E.mindir").write_bytes(b"stale")
    files = TARGET.save(module, prog.weights, io_names(manifest, "E"), tmp_path, "SliMM_E")
    assert files == ["SliMM_E.mindir"]
    assert (tmp_path / "SliMM_E.mindir").stat().st_mode & 0o777 == 0o644
    feeds = make_feeds(manifest, "E", SHAPES[0], np.random.default_rng(0))
    sess = ort.InferenceSession(str(onnx_dir / part_file("E")), providers=["CPUExecutionProvider"])
    check(TARGET.load(tmp_path, "SliMM_E")(feeds["position_ids"]), sess.run(None, feeds), ["cos", "sin"], "E")


def test_generated_cell_holds_weights_as_parameters(converted):
    onnx_dir, out, _ = converted("plain")
    module = import_generated(out / "gen_F.py")
    _, prog = generate_source(onnx_dir / part_file("F"), "mindspore")
    cell = module.Model(prog.weights)
    params = {p.name for p in cell.get_parameters()}
    assert params == set(prog.weights) and params
    assert "lambda" not in Path(out / "gen_F.py").read_text()  # graph mode parses the source
