"""`slimm convert`: an export directory -> a directory that runs with one framework alone.

Per part: generated module source (kept for reading and debugging), the framework's deployable
artifact, and a manifest naming the framework, its version and the export it came from.
`validate` runs every intermediate tensor against ONNX Runtime and names the first divergence.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from slimm.convert import TARGETS, generate_source, get_target, import_generated
from slimm.convert.graph import ConversionError
from slimm.export.manifest import MANIFEST, MANIFEST_VERSION, PARTS, read_manifest
from slimm.vision_index import vision_host_inputs

VALIDATE_RTOL = 1e-5  # relative to the largest magnitude of the reference tensor
SAMPLE_SIZES = {"batch": 2, "seq": 5, "capacity": 9, "tokens": 6}


def framework_version(target: str) -> str:
    from importlib.metadata import version

    return version({"jax": "jax", "paddle": "paddlepaddle", "mindspore": "mindspore"}[target])


def converted_format(target: str) -> str:
    return f"slimm-{target}"


def sample_inputs(manifest: dict, part: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Small valid inputs for one part, from its declared I/O (index inputs kept in range)."""
    cfg = manifest["config"]
    rng = np.random.default_rng(seed)
    specs = manifest["parts"][part]["inputs"]
    if part == "B":
        tokens = SAMPLE_SIZES["tokens"]  # even, so Efficient's 2x2 groups fit
        grid = np.array([[1, 4, tokens]])
        host = vision_host_inputs(cfg.deepstack_type, cfg.spatial_merge_size, grid)
        width = specs[0]["dims"][1]
        return {"pixel_values": rng.standard_normal((4 * tokens, width)).astype(np.float32), **host}
    out = {}
    for t in specs:
        dims = []
        for d in t["dims"]:
            if isinstance(d, int):
                dims.append(d)
            else:
                k, _, name = d.rpartition("*")
                dims.append((int(k) if k else 1) * SAMPLE_SIZES.get(name, 3))
        if t["name"] == "visual_pos":
            total = SAMPLE_SIZES["batch"] * SAMPLE_SIZES["seq"]
            out[t["name"]] = np.sort(rng.choice(total, dims[0], replace=False)).astype(np.int64)
        elif t["name"] in ("past_mask", "cur_mask"):
            out[t["name"]] = (rng.random(dims) > 0.3).astype(np.int64)
        elif t["dtype"] == "int64":
            out[t["name"]] = rng.integers(0, 50, dims).astype(np.int64)
        else:
            out[t["name"]] = rng.standard_normal(dims).astype(t["dtype"])
    return out


def validate_part(onnx_path: Path, target: str, manifest: dict, part: str, work: Path) -> str:
    """Run the generated code with every intermediate returned, against ONNX Runtime with every
    intermediate exposed; raise ConversionError at the first tensor off by more than VALIDATE_RTOL."""
    import onnx
    import onnxruntime as ort

    src, prog = generate_source(onnx_path, target, name=onnx_path.stem, trace=True)
    gen = work / f"{onnx_path.stem}_trace.py"
    gen.write_text(src)
    run = get_target(target).runner(import_generated(gen), prog.weights)
    feeds = sample_inputs(manifest, part)
    got = run(*[feeds[v.name] for v in prog.inputs])

    model = onnx.load(str(onnx_path))
    out_names = {v.name for v in prog.outputs}
    returned = [v.name for v in prog.outputs] + [
        o.name for n in prog.nodes for o in n.outputs if o.name not in out_names
    ]
    got = dict(zip(returned, got, strict=True))
    names = [o.name for n in prog.nodes for o in n.outputs]  # compared in the order they are computed
    existing = {o.name for o in model.graph.output}
    for n in names:
        if n not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=n))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    producer = {o.name: n for n in prog.nodes for o in n.outputs}
    worst = 0.0
    for name in names:
        r, g = ref[name], np.asarray(got[name])
        if g.shape != r.shape:
            node = producer.get(name)
            raise ConversionError(
                f"{target} {part}: first divergence at {_where(node, name)}: shape {g.shape}, ONNX Runtime {r.shape}"
            )
        if r.dtype.kind == "f" and r.size:
            err = float(np.abs(g.astype(np.float64) - r).max() / max(np.abs(r).max(), 1e-30))
            worst = max(worst, err)
            if err > VALIDATE_RTOL:
                raise ConversionError(
                    f"{target} {part}: first divergence at {_where(producer.get(name), name)}: "
                    f"max relative error {err:.2e} > tolerance {VALIDATE_RTOL:.0e}"
                )
        elif r.size and not np.array_equal(g, r):
            raise ConversionError(
                f"{target} {part}: first divergence at {_where(producer.get(name), name)}: values differ"
            )
    return f"{len(names)} tensors within {VALIDATE_RTOL:.0e} (worst {worst:.1e})"


def _where(node, name: str) -> str:
    return f"node {node.name!r} ({node.op}) output {name!r}" if node is not None else f"output {name!r}"


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
