"""`slimm convert`: an export directory -> a directory that runs with one framework alone.

Per part: generated module source (kept for reading and debugging), the framework's deployable
artifact, and a manifest naming the framework, its version and the export it came from.
With `validate`, every intermediate tensor is checked against ONNX Runtime (validate.py).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from slimm.convert import (
    TARGETS,
    converted_format,
    framework_version,
    generate_source,
    get_target,
    import_generated,
)
from slimm.convert.ir import ConversionError
from slimm.convert.validate import validate_part
from slimm.errors import InputError
from slimm.export.manifest import MANIFEST, MANIFEST_VERSION, PARTS, read_manifest
from slimm.outdir import plain_name, staged


def convert_export(
    export_dir: str | Path,
    target: str,
    out_dir: str | Path,
    validate: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Convert an ONNX export directory for `target` into `out_dir`. The result is built in a
    sibling directory and moved into place when complete; an existing `out_dir` is replaced only
    when it is empty, a previous conversion, or `overwrite` is given."""
    if target not in TARGETS:
        raise ConversionError(f"unknown target {target!r}; one of {', '.join(TARGETS)}")
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    check_out_dir(export_dir, out_dir, overwrite)
    manifest = read_manifest(export_dir)
    where = export_dir / MANIFEST
    for part in PARTS:
        plain_name(manifest["parts"][part]["file"], where, f"entry parts.{part}.file")
    for name in manifest.get("files", []):
        plain_name(name, where, "entry files")
    contrib = {
        p: manifest["parts"][p].get("contrib_ops") for p in PARTS if manifest["parts"][p].get("contrib_ops")
    }
    if contrib:
        what = "; ".join(f"part {p} uses {', '.join(ops)}" for p, ops in contrib.items())
        fused = " fused" if "GroupQueryAttention" in contrib.get("F", []) else ""
        raise ConversionError(
            f"{export_dir}: a {manifest.get('precision')}{fused} export runs on ONNX Runtime only ({what}: "
            "ONNX Runtime's own operators, which no target converts); convert an fp32 or fp16 export "
            "made without --fused instead"
        )
    if manifest.get("quantization"):
        raise ConversionError(
            f"{export_dir}: a {manifest.get('precision')} export runs on ONNX Runtime only (its parts use "
            "ONNX Runtime's quantized operators); convert the fp32 or fp16 export instead"
        )
    try:
        tgt = get_target(target)
    except ImportError as e:
        from slimm.errors import BackendUnavailable

        raise BackendUnavailable(f"converting to {target} needs its framework installed ({e})") from None
    with staged(out_dir) as build:
        _convert_into(build, export_dir, manifest, target, tgt, validate, progress)
    return out_dir


def check_out_dir(export_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, an `out_dir` that is the export directory, inside it or holding it;
    and a non-empty one that is not a previous conversion, unless `overwrite`."""
    src, out = export_dir.resolve(), out_dir.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise InputError(
            f"--out {out_dir} must not be the export directory {export_dir}, inside it or hold it"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} exists and is not a directory")
    if overwrite or not out_dir.exists() or not any(out_dir.iterdir()):
        return
    try:
        fmt = json.loads((out_dir / MANIFEST).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt not in {converted_format(t) for t in TARGETS}:
        raise InputError(
            f"--out {out_dir} is not empty and not a previous `slimm convert` output: choose another "
            "directory, or pass --overwrite (overwrite=True) to replace it"
        )


def _convert_into(
    build: Path, export_dir: Path, manifest: dict, target: str, tgt, validate, progress
) -> None:
    from tqdm import tqdm

    parts_out, reports = {}, {}
    bar = tqdm(PARTS, desc=f"convert to {target}", unit="part", disable=not progress, file=sys.stderr)
    for part in bar:
        entry = manifest["parts"][part]
        onnx_path = export_dir / entry["file"]
        name = Path(entry["file"]).stem
        bar.set_postfix_str(f"{part}: {entry['role']}")
        src, prog = generate_source(onnx_path, target, name=name)
        (build / f"{name}.py").write_text(src)
        module = import_generated(build / f"{name}.py")
        declared = {t["name"]: t for t in entry["inputs"]}
        inputs = []
        for v in prog.inputs:
            t = declared[v.name]
            dims = [d if isinstance(d, int) or tgt.symbolic_dims else None for d in t["dims"]]
            inputs.append((v.name, t["dtype"], dims))
        files = tgt.save(module, prog.weights, inputs, build, name)
        if validate:
            reports[part] = validate_part(onnx_path, target, manifest, part, build)
            bar.write(f"  validated {part}: {reports[part]}", file=sys.stderr)
        parts_out[part] = {
            "name": name,
            "source": f"{name}.py",
            "files": files,
            "role": entry["role"],
            "inputs": [{**t} for t in entry["inputs"] if t["name"] in {v.name for v in prog.inputs}],
            "outputs": entry["outputs"],
            "input_order": [v.name for v in prog.inputs],
        }
    for name in manifest.get("files", []):
        shutil.copyfile(export_dir / name, build / name)
    out_manifest = {
        "format": converted_format(target),
        "version": MANIFEST_VERSION,
        "target": target,
        "framework_version": framework_version(target),
        "export_id": manifest["export_id"],
        "precision": manifest.get("precision"),
        "opset": manifest.get("opset"),
        "max_seq_len": manifest["max_seq_len"],
        "model": manifest["model"],
        "parts": parts_out,
        "tokenizer": manifest.get("tokenizer"),
        "files": manifest.get("files", []),
        "validated": reports or None,
        "source": str(export_dir.resolve()),
    }
    (build / MANIFEST).write_text(json.dumps(out_manifest, indent=2))
