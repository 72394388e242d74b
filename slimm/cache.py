"""The user's slimm cache ($SLIMM_CACHE, else $XDG_CACHE_HOME/slimm or ~/.cache/slimm) and the demo
artefacts built in it once, on first use: the random-weight demo checkpoint, its export and
conversions, and the trained demo model's (unpacked from the package when it ships there).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("SLIMM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slimm"
    )
    return Path(root)


def demo_model_dir(variant: str = "plain", size: str = "tiny") -> Path:
    """The built-in demo checkpoint, written once into the cache directory."""
    from slimm.demo import write_demo_checkpoint

    path = cache_dir() / f"demo-{size}-{variant}"
    if not (path / "model.safetensors").exists():
        print(
            f"building the {size} {variant} demo checkpoint (random weights) in {path} ...", file=sys.stderr
        )
        write_demo_checkpoint(path, variant=variant, size=size)
    return path


def demo_export_dir(variant: str = "plain", size: str = "tiny") -> Path:
    """The demo checkpoint exported to ONNX, written once into the cache directory."""
    path = cache_dir() / f"demo-{size}-{variant}-onnx"
    if not (path / "manifest.json").exists():
        from slimm.export import export_model

        print(f"exporting the demo checkpoint to ONNX in {path} ...", file=sys.stderr)
        export_model(demo_model_dir(variant, size), path)
    return path


def demo_converted_dir(target: str, variant: str = "plain", size: str = "tiny") -> Path:
    """The demo export converted to `target`, written once into the cache directory."""
    path = cache_dir() / f"demo-{size}-{variant}-{target}"
    if not (path / "manifest.json").exists():
        from slimm.convert.driver import convert_export

        print(f"converting the demo export to {target} in {path} ...", file=sys.stderr)
        convert_export(demo_export_dir(variant, size), target, path)
    return path


def trained_demo_export_dir(precision: str = "fp32") -> Path:
    """The trained demo model exported to ONNX at `precision`, written once into the cache directory."""
    from slimm.trained_demo import trained_demo_dir

    src = trained_demo_dir()
    path = src.with_name(src.name + "-onnx" + ("" if precision == "fp32" else f"-{precision}"))
    if not (path / "manifest.json").exists():
        from slimm.export import export_model

        print(f"exporting the demo model to ONNX ({precision}) in {path} ...", file=sys.stderr)
        export_model(src, path, precision=precision)
    return path


def trained_demo_converted_dir(target: str) -> Path:
    """The trained demo model's export converted to `target`, written once into the cache."""
    src = trained_demo_export_dir()
    path = src.with_name(src.name.removesuffix("-onnx") + f"-{target}")
    if not (path / "manifest.json").exists():
        from slimm.convert.driver import convert_export

        print(f"converting the demo model to {target} in {path} ...", file=sys.stderr)
        convert_export(src, target, path)
    return path


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
        raise ValueError(f"the {backend} backend runs the demo model in fp32, not {precision}")
    if backend == "torch":
        from slimm.trained_demo import trained_demo_dir

        return trained_demo_dir()
    return trained_demo_converted_dir(backend)
