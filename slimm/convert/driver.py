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
from slimm.manifest import MANIFEST, MANIFEST_VERSION, PARTS, read_manifest


def convert_export(
    export_dir: str | Path, target: str, out_dir: str | Path, validate: bool = False, progress: bool = True
) -> Path:
    from tqdm import tqdm

    if target not in TARGETS:
        raise ConversionError(f"unknown target {target!r}; one of {', '.join(TARGETS)}")
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    manifest = read_manifest(export_dir)
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
    out_dir.mkdir(parents=True, exist_ok=True)
    parts_out, reports = {}, {}
    bar = tqdm(PARTS, desc=f"convert to {target}", unit="part", disable=not progress, file=sys.stderr)
    for part in bar:
        entry = manifest["parts"][part]
        onnx_path = export_dir / entry["file"]
        name = Path(entry["file"]).stem
        bar.set_postfix_str(f"{part}: {entry['role']}")
        src, prog = generate_source(onnx_path, target, name=name)
        (out_dir / f"{name}.py").write_text(src)
        module = import_generated(out_dir / f"{name}.py")
        declared = {t["name"]: t for t in entry["inputs"]}
        inputs = []
        for v in prog.inputs:
            t = declared[v.name]
            dims = [d if isinstance(d, int) or tgt.symbolic_dims else None for d in t["dims"]]
            inputs.append((v.name, t["dtype"], dims))
        files = tgt.save(module, prog.weights, inputs, out_dir, name)
        if validate:
            reports[part] = validate_part(onnx_path, target, manifest, part, out_dir)
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
        shutil.copyfile(export_dir / name, out_dir / name)
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
    (out_dir / MANIFEST).write_text(json.dumps(out_manifest, indent=2))
    return out_dir
