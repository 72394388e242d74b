"""The contract of a converted part, the same for every target (jax, paddle, mindspore): every part
of tiny exports of all four variants, saved and reloaded through the target's runtime, matches ONNX
Runtime at several input shapes; a converted directory loads in a fresh process without onnx,
onnxruntime, torch, the code generator or its handlers; a broken artifact file is a CheckpointError
naming it.
"""

from __future__ import annotations

import numpy as np
import pytest
from prompts import run_python

pytest.importorskip("onnxruntime")

from convert_helpers import (  # noqa: E402
    ARTIFACT_FILES,
    DECODE,
    SHAPES,
    check,
    io_names,
    make_feeds,
    ort_run,
    output_names,
)

from slimm.convert import TARGETS, get_runtime  # noqa: E402
from slimm.errors import CheckpointError  # noqa: E402
from slimm.export.manifest import PARTS, part_file, read_manifest  # noqa: E402
from slimm.frameworks import FRAMEWORKS  # noqa: E402

VARIANTS = ("plain", "v1", "midlayers", "efficient")
# a decode step feeds zero visual tokens; jax.export's symbolic sizes are >= 1 (the JAX backend
# skips those inputs' parts instead)
ZERO_SIZES = {"jax": False, "paddle": True, "mindspore": True}


@pytest.fixture(params=TARGETS)
def target(request):
    pytest.importorskip(FRAMEWORKS[request.param].module)
    return request.param


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_part_matches_onnxruntime_at_several_shapes(exported, converted, target, variant):
    onnx_dir, out = exported(variant), converted(target, variant)
    manifest = read_manifest(onnx_dir)
    rt = get_runtime(target)
    for part in PARTS:
        run = rt.load(out, f"SliMM_{part}")  # one loaded part, new shapes: the dims really are dynamic
        names = [n for n, _, _ in io_names(manifest, part)]
        for k, shape in enumerate(SHAPES + ((DECODE,) if part in ("C", "F") and ZERO_SIZES[target] else ())):
            feeds = make_feeds(manifest, part, shape, np.random.default_rng(k))
            got = [rt.to_numpy(o) for o in run(*(feeds[n] for n in names))]
            ref = ort_run(onnx_dir / part_file(part), feeds)
            check(got, ref, f"{target} {variant} {part} shape {k}", output_names(manifest, part))


# Loading as `slimm.load` does, in a fresh interpreter where onnx, onnxruntime and torch cannot be
# imported; afterwards no module of the code generator may have been imported either.
LOAD_ALONE = """
import sys
for name in ("onnx", "onnxruntime", "torch"):
    sys.modules[name] = None  # `import name` now raises ImportError
import numpy as np
import slimm

backend = slimm.load(sys.argv[1], backend=sys.argv[2])
feeds = dict(np.load(sys.argv[3]))
got = [backend.to_numpy(o) for o in backend.run_part("F", feeds)]
np.savez(sys.argv[4], *got)
allowed = {"slimm.convert", "slimm.convert.ir", "slimm.convert.targets",
           f"slimm.convert.targets.{sys.argv[2]}", f"slimm.convert.targets.{sys.argv[2]}.runtime"}
print("CONVERT MODULES", sorted(m for m in sys.modules if m.startswith("slimm.convert") and m not in allowed))
"""


def test_converted_dir_loads_without_onnx_torch_or_the_code_generator(exported, converted, target, tmp_path):
    onnx_dir, out = exported("v1"), converted(target, "v1")
    manifest = read_manifest(onnx_dir)
    feeds = make_feeds(manifest, "F", SHAPES[1], np.random.default_rng(5))
    np.savez(tmp_path / "in.npz", **feeds)
    args = [str(out), target, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")]
    # cwd: MindSpore writes rank_0/ debug dumps into the working directory on failures
    proc = run_python(LOAD_ALONE, *args, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CONVERT MODULES []" in proc.stdout, proc.stdout
    res = np.load(tmp_path / "out.npz")
    got = [res[f"arr_{i}"] for i in range(len(res.files))]
    check(
        got, ort_run(onnx_dir / part_file("F"), feeds), f"{target} subprocess F", output_names(manifest, "F")
    )


def _broken_cases():
    return [
        (t, suffix, how)
        for t in TARGETS
        for suffix in ARTIFACT_FILES[t]
        for how in ("missing", "empty", "garbage", "truncated")
    ]


@pytest.mark.parametrize("target_name, suffix, how", _broken_cases())
def test_broken_artifact_file_is_a_checkpoint_error_naming_it(converted, tmp_path, target_name, suffix, how):
    pytest.importorskip(FRAMEWORKS[target_name].module)
    out = converted(target_name, "plain")
    for s in ARTIFACT_FILES[target_name]:
        (tmp_path / f"SliMM_B{s}").write_bytes((out / f"SliMM_B{s}").read_bytes())
    path = tmp_path / f"SliMM_B{suffix}"
    if how == "missing":
        path.unlink()
    else:
        good = path.read_bytes()
        path.write_bytes(
            {"empty": b"", "garbage": b"\x00\x01 not a model\n" * 8, "truncated": good[: len(good) // 2]}[how]
        )
    with pytest.raises(CheckpointError, match=str(path).replace(".", r"\.")):
        get_runtime(target_name).load(tmp_path, "SliMM_B")


@pytest.mark.parametrize("name", ["../SliMM_B", "/etc/passwd", "a/b", "..", ""])
def test_a_part_name_that_is_not_a_plain_file_name_is_refused(target, tmp_path, name):
    with pytest.raises(CheckpointError, match="not a plain file name"):
        get_runtime(target).load(tmp_path, name)
