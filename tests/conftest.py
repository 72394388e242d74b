"""Shared fixtures: tiny demo checkpoints (seeded random weights in the released format)."""

from __future__ import annotations

import importlib.util

import pytest

# MindSpore and Paddle each ship a libdnnl.so.3; MindSpore only loads if its copy comes first
# (Paddle runs fine on it). Import order must not depend on which test happens to run first.
if importlib.util.find_spec("mindspore") and importlib.util.find_spec("paddle"):
    import mindspore  # noqa: F401

VARIANTS = ("plain", "v1", "midlayers", "efficient")


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
def converted(exported, tmp_path_factory):
    """converted(target, variant) -> directory converted by `slimm convert`, written once; skips
    when the framework (or its target package) is not available."""
    made = {}

    def get(target, variant="plain"):
        from prompts import FRAMEWORK

        from slimm.convert import get_target

        pytest.importorskip(FRAMEWORK[target])
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
