"""Shared fixtures: one slimm cache for the run, tiny demo checkpoints (seeded random weights in the
released format)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from slimm.frameworks import FRAMEWORKS
from slimm.frameworks.paddle import preload_mindspore_onednn

# tests import paddle directly too (pytest.importorskip): MindSpore's oneDNN must be loaded first
# whichever test runs first (see slimm.frameworks.paddle)
preload_mindspore_onednn()

# the SIMD extensions that decide which kernels ONNX Runtime (MLAS), oneDNN, XLA and torch pick:
# tolerances are set from measurements on AVX2-only and AVX-512 VNNI machines (tests/export/test_quantize.py)
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")


def cpu_summary() -> str:
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        import platform

        return f"cpu: {platform.processor() or platform.machine()} (no /proc/cpuinfo)"
    model = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?"
    )
    flags = next(
        (line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []
    )
    present = [f for f in CPU_FLAGS if f in flags]
    return f"cpu: {model}; SIMD: {' '.join(present) or 'none of ' + ', '.join(CPU_FLAGS)}"


@pytest.fixture(scope="session", autouse=True)
def slimm_cache(tmp_path_factory):
    """$SLIMM_CACHE for the whole run, subprocesses included: the trained demo model is unpacked,
    exported, quantized and converted there once and shared by every test that uses it. Set
    $SLIMM_TEST_CACHE to keep it between runs (it is never the user's own cache)."""
    path = os.environ.get("SLIMM_TEST_CACHE") or str(tmp_path_factory.mktemp("slimm-cache"))
    old = os.environ.get("SLIMM_CACHE")
    os.environ["SLIMM_CACHE"] = path
    yield Path(path)
    if old is None:
        os.environ.pop("SLIMM_CACHE", None)
    else:
        os.environ["SLIMM_CACHE"] = old


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """demo_dir(variant) -> path of a tiny checkpoint of that variant, written once per session."""
    from slimm.demo import write_demo_checkpoint

    made = {}

    def get(variant: str = "plain"):
        if variant not in made:
            made[variant] = write_demo_checkpoint(
                tmp_path_factory.mktemp(f"demo-{variant}") / "ckpt", variant=variant
            )
        return made[variant]

    return get


@pytest.fixture(scope="session")
def torch_model(demo_dir):
    """torch_model(variant) -> SliMMForConditionalGeneration in float32, loaded once per session."""
    from slimm.model.slimm import SliMMForConditionalGeneration

    made = {}

    def get(variant: str = "plain"):
        if variant not in made:
            made[variant] = SliMMForConditionalGeneration.from_pretrained(
                demo_dir(variant), torch_dtype="float32"
            )
        return made[variant]

    return get


@pytest.fixture(scope="session")
def exported(demo_dir, tmp_path_factory):
    """exported(variant, precision) -> ONNX export directory (max_seq_len 256), written once."""
    pytest.importorskip("onnxruntime")
    from slimm.export import export_model

    made = {}

    def get(variant="plain", precision="fp32"):
        key = (variant, precision)
        if key not in made:
            out = tmp_path_factory.mktemp(f"onnx-{variant}-{precision}")
            made[key] = export_model(
                demo_dir(variant), out, precision=precision, max_seq_len=256, progress=False
            )
        return made[key]

    return get


@pytest.fixture(scope="session")
def quantized(exported, tmp_path_factory):
    """quantized(precision) -> the plain tiny export quantized at `precision`, written once."""
    from slimm.export.quantize import quantize_export

    made = {}

    def get(precision):
        if precision not in made:
            out = tmp_path_factory.mktemp(f"onnx-plain-{precision}")
            made[precision] = quantize_export(exported("plain"), out, precision, progress=False)
        return made[precision]

    return get


@pytest.fixture(scope="session")
def converted(exported, tmp_path_factory):
    """converted(target, variant) -> directory converted by `slimm convert`, written once; skips
    when the framework (or its target package) is not available."""
    made = {}

    def get(target, variant="plain"):
        from slimm.convert import get_target

        pytest.importorskip(FRAMEWORKS[target].module)
        from slimm.convert.driver import convert_export

        try:
            get_target(target)
        except ImportError as e:
            pytest.skip(f"target {target} unavailable: {e}")
        key = (target, variant)
        if key not in made:
            out = tmp_path_factory.mktemp(f"{target}-{variant}")
            made[key] = convert_export(exported(variant), target, out, progress=False)
        return made[key]

    return get


def pytest_report_header(config):
    return cpu_summary()


def pytest_terminal_summary(terminalreporter):
    # also under -q, which hides the header: a failure report says which CPU it ran on
    terminalreporter.write_line(f"ran on {cpu_summary()}")
