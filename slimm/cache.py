"""The user's slimm cache ($SLIMM_CACHE, else $XDG_CACHE_HOME/slimm or ~/.cache/slimm) and the demo
artefacts built in it once, on first use: the random-weight demo checkpoint, its export and
conversions, and the trained demo model's (unpacked from the package when it ships there).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from slimm.errors import InputError


def cache_dir() -> Path:
    root = os.environ.get("SLIMM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slimm"
    )
    return Path(root)


def built_once(path: Path, marker: str, what: str, build) -> Path:
    """`path`, after `build(path)` has written it there (said on stderr) unless `marker` is there already."""
    if not (path / marker).exists():
        print(f"{what} in {path} ...", file=sys.stderr)
        build(path)
    return path


def demo_model_dir(variant: str = "plain", size: str = "tiny") -> Path:
    """The built-in demo checkpoint, written once into the cache directory."""
    from slimm.demo import write_demo_checkpoint

    return built_once(
        cache_dir() / f"demo-{size}-{variant}",
        "model.safetensors",
        f"building the {size} {variant} demo checkpoint (random weights)",
        lambda path: write_demo_checkpoint(path, variant=variant, size=size),
    )


def export_once(src: Path, path: Path, what: str, precision: str = "fp32") -> Path:
    """`src` exported to ONNX at `precision` in `path`, written once (the exporter imported only then)."""

    def build(out: Path) -> None:
        from slimm.export import export_model

        export_model(src, out, precision=precision)

    return built_once(path, "manifest.json", f"exporting {what} to ONNX ({precision})", build)


def convert_once(src: Path, target: str, path: Path, what: str) -> Path:
    """The export `src` converted to `target` in `path`, written once (the converter imported only then)."""

    def build(out: Path) -> None:
        from slimm.convert.driver import convert_export

        convert_export(src, target, out)

    return built_once(path, "manifest.json", f"converting {what} to {target}", build)


def demo_export_dir(variant: str = "plain", size: str = "tiny") -> Path:
    """The demo checkpoint exported to ONNX, written once into the cache directory."""
    path = cache_dir() / f"demo-{size}-{variant}-onnx"
    if (path / "manifest.json").exists():  # no demo checkpoint needed
        return path
    return export_once(demo_model_dir(variant, size), path, "the demo checkpoint")


def demo_converted_dir(target: str, variant: str = "plain", size: str = "tiny") -> Path:
    """The demo export converted to `target`, written once into the cache directory."""
    path = cache_dir() / f"demo-{size}-{variant}-{target}"
    if (path / "manifest.json").exists():
        return path
    return convert_once(demo_export_dir(variant, size), target, path, "the demo export")


def trained_demo_export_dir(precision: str = "fp32") -> Path:
    """The trained demo model exported to ONNX at `precision`, written once into the cache directory."""
    from slimm.trained_demo import trained_demo_dir

    src = trained_demo_dir()
    path = src.with_name(src.name + "-onnx" + ("" if precision == "fp32" else f"-{precision}"))
    return export_once(src, path, "the demo model", precision)


def trained_demo_converted_dir(target: str) -> Path:
    """The trained demo model's export converted to `target`, written once into the cache."""
    src = trained_demo_export_dir()
    return convert_once(
        src, target, src.with_name(src.name.removesuffix("-onnx") + f"-{target}"), "the demo model"
    )


def demo_dir_for(backend: str) -> Path:
    """What `backend` loads when no model is given: the random-weight demo checkpoint, its export or
    a conversion. (The trained demo model replaces it here once it is shipped; see trained_demo_dir_for.)"""
    if backend == "torch":
        return demo_model_dir()
    if backend == "onnx" or backend.endswith("-ort"):
        return demo_export_dir()
    return demo_converted_dir(backend)


def trained_demo_dir_for(backend: str, precision: str = "fp32") -> Path:
    """The trained demo model's checkpoint, export (at `precision`) or conversion that `backend` loads."""
    if backend == "onnx" or backend.endswith("-ort"):
        return trained_demo_export_dir(precision)
    if precision != "fp32":
        raise InputError(f"the {backend} backend runs the demo model in fp32, not {precision}")
    if backend == "torch":
        from slimm.trained_demo import trained_demo_dir

        return trained_demo_dir()
    return trained_demo_converted_dir(backend)
