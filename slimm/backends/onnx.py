"""ONNX Runtime backend: the six parts of an export directory, one InferenceSession each.

Needs onnxruntime, numpy, tokenizers and Pillow only (no torch). Every part file is checked
against the manifest at load time: present, from the same export, with the declared inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimm.backends.parts import PartsBackend
from slimm.errors import BackendUnavailable, CheckpointError, InputError
from slimm.export.manifest import PARTS, Manifest

OPT_LEVELS = ("disable", "basic", "extended", "all")


def session_options(threads: int | None = None, opt_level: str = "all"):
    import onnxruntime as ort

    if opt_level not in OPT_LEVELS:
        raise InputError(f"graph optimisation level {opt_level!r} is not one of {', '.join(OPT_LEVELS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    return so


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise InputError(
                f"--device cuda: onnxruntime here has no CUDAExecutionProvider (has {available})"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "auto":
        return (
            ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if "CUDAExecutionProvider" in available
            else ["CPUExecutionProvider"]
        )
    raise InputError(f"device {device!r} is not one of auto, cpu, cuda")


def check_part_file(export_dir: Path, manifest: Manifest, part: str) -> Path:
    """The part file exists, its data file too, and it was written by this export."""
    import onnx

    entry = manifest.parts[part]
    if entry.file is None:
        raise CheckpointError(f"{export_dir / 'manifest.json'}: entry parts.{part} names no ONNX file")
    path = export_dir / entry.file
    if not path.exists():
        raise CheckpointError(f"{path}: part {part} ({entry.role}) is missing")
    if entry.data and not (export_dir / entry.data).exists():
        raise CheckpointError(f"{export_dir / entry.data}: weights of part {part} ({path.name}) are missing")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several unrelated types for a bad file
        raise CheckpointError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("slimm.part") != part or meta.get("slimm.export_id") != manifest.export_id:
        raise CheckpointError(
            f"{path}: this file is part {meta.get('slimm.part')!r} of export {meta.get('slimm.export_id')!r}, "
            f"but the manifest expects part {part!r} of export {manifest.export_id!r}: parts from "
            "another export (or another model) cannot be mixed"
        )
    return path


class OnnxBackend(PartsBackend):
    name = "onnx"

    def __init__(self, export_dir, device: str = "auto", threads: int | None = None, opt_level: str = "all",
                 wrapper: str | None = None) -> None:  # fmt: skip
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailable(f"backend 'onnx' needs the 'onnxruntime' package ({e})") from None
        export_dir = Path(export_dir)
        manifest = Manifest.read(export_dir)
        super().__init__(export_dir, manifest)
        so = session_options(threads, opt_level)
        providers = providers_for(device)
        self.sessions = {}
        for part in PARTS:
            path = check_part_file(export_dir, manifest, part)
            try:
                sess = ort.InferenceSession(str(path), so, providers=providers)
            except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
                raise CheckpointError(f"{path}: ONNX Runtime cannot load part {part}: {e}") from None
            got = [i.name for i in sess.get_inputs()]
            want = [t.name for t in manifest.parts[part].inputs]
            if sorted(got) != sorted(want):
                raise CheckpointError(
                    f"{path}: inputs {got} do not match manifest.json's {want} for part {part}"
                )
            self.sessions[part] = sess
        self.wrapper = None
        if wrapper is not None:
            from slimm.wrappers import WRAPPERS

            if wrapper not in WRAPPERS:
                raise InputError(f"unknown wrapper {wrapper!r}; one of {', '.join(WRAPPERS)}")
            self.wrapper = WRAPPERS[wrapper]
            self.wrapped = {p: self.wrapper(str(export_dir / manifest.parts[p].file), device=device,
                                            intra_op_num_threads=threads) for p in PARTS}  # fmt: skip
            self.name = f"{wrapper}-ort"

    @classmethod
    def load(cls, path, device: str = "auto", threads: int | None = None, opt_level: str = "all", **kwargs):
        return cls(path, device=device, threads=threads, opt_level=opt_level, **kwargs)

    def run_part(self, part, feeds):
        if self.wrapper is None:
            return self.sessions[part].run(self.out_names[part], feeds)
        w = self.wrapped[part]
        outs = w.run_dict(
            **{k: w.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in feeds.items()}
        )
        return [outs[n] for n in self.out_names[part]]

    def to_numpy(self, x):
        if self.wrapper is None or isinstance(x, np.ndarray):
            return x
        return self.wrapped["A"].to_numpy(x)
