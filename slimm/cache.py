"""The user's slimm cache ($SLIMM_CACHE, else $XDG_CACHE_HOME/slimm or ~/.cache/slimm) and the demo
artefacts built in it once, on first use: the trained demo model (unpacked from the package), its
export and conversions, and the random-weight checkpoints the tests and benchmarks use.
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


def trained_demo_export_dir(precision: str = "fp32") -> Path:
    """The trained demo model exported to ONNX at `precision`, written once into the cache directory."""
    from slimm.export.quantize import PRECISIONS as QUANTIZED
    from slimm.trained_demo import trained_demo_dir

    src = trained_demo_dir()
    path = src.with_name(src.name + "-onnx" + ("" if precision == "fp32" else f"-{precision}"))
    if precision not in QUANTIZED:
        return export_once(src, path, "the demo model", precision)

    def build(out: Path) -> None:  # what export_model does, from the fp32 export cached once
        from slimm.export.quantize import quantize_export

        quantize_export(trained_demo_export_dir(), out, precision)

    return built_once(path, "manifest.json", f"quantizing the demo model's export ({precision})", build)


def trained_demo_converted_dir(target: str) -> Path:
    """The trained demo model's export converted to `target`, written once into the cache."""
    src = trained_demo_export_dir()
    return convert_once(
        src, target, src.with_name(src.name.removesuffix("-onnx") + f"-{target}"), "the demo model"
    )


def demo_dir_for(backend: str, precision: str = "fp32") -> Path:
    """What `backend` loads when no model is given: the trained demo model's checkpoint, its export
    (at `precision`) or its conversion, unpacked or built once into the cache."""
    if backend == "onnx" or backend.endswith("-ort"):
        return trained_demo_export_dir(precision)
    if precision != "fp32":
        raise InputError(f"the {backend} backend runs the demo model in fp32, not {precision}")
    if backend == "torch":
        from slimm.trained_demo import trained_demo_dir

        return trained_demo_dir()
    return trained_demo_converted_dir(backend)
