"""ONNX Runtime: the one place sessions are built (`make_session`, used by OnnxBackend and by
slimm.wrappers), and the backend over the six parts of an export directory, one session each.

Needs onnxruntime, numpy, tokenizers and Pillow only (no torch). Every part file is checked
against the manifest at load time: present, from the same export, with the declared inputs. A
mixed-precision export's F has a second file for prompts (its `prefill` variant): steps with more
than one new token a row run it, one-token decode steps run F's own.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from slimm import frameworks
from slimm.backends.parts import PartsBackend
from slimm.errors import BackendUnavailable, CheckpointError, InputError
from slimm.export.manifest import PARTS, Manifest

# --opt-level / graph_optimization_level -> ONNX Runtime's GraphOptimizationLevel member
OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",
    "all": "ORT_ENABLE_ALL",
}
DEVICES = ("auto", "cpu", "cuda")
# ONNX Runtime starts every intra-op thread it is asked for, at session creation: far more than
# any machine has cores only exhausts memory, and then reads as a broken model file
MAX_THREADS = 1024
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def check_session_options(
    threads: int | None = None,
    opt_level: str = "all",
    device: str = "auto",
    who: str = "ONNX Runtime",
    names: tuple[str, str] = ("threads", "opt_level"),
) -> None:
    """The options every session takes, checked the same wherever they come from (`names`: what the
    caller calls the first two)."""
    if threads is not None and (type(threads) is not int or not 0 <= threads <= MAX_THREADS):
        raise InputError(
            f"{who} option {names[0]} must be an int from 0 (ONNX Runtime decides) to {MAX_THREADS}, "
            f"or None; got {threads!r}"
        )
    if not isinstance(opt_level, str) or opt_level not in OPT_LEVELS:
        raise InputError(f"{who} option {names[1]} must be one of {', '.join(OPT_LEVELS)}, got {opt_level!r}")
    if not isinstance(device, str) or device not in DEVICES:
        raise InputError(f"{who} option device must be one of {', '.join(DEVICES)}, got {device!r}")


def session_options(threads: int | None = None, opt_level: str = "all"):
    """`onnxruntime.SessionOptions` for `threads` intra-op threads (None or 0: ONNX Runtime's
    choice) at graph optimisation level `opt_level`."""
    check_session_options(threads, opt_level)
    ort = frameworks.startup("onnxruntime")
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[opt_level])
    if threads:
        so.intra_op_num_threads = threads
    if not frameworks.quiet.verbose():
        so.log_severity_level = 3  # errors only: warnings about unused initializers are noise here
    return so


_shared_arena = threading.Lock()
_shared_arena_ready = False


def share_cpu_arena(ort) -> None:
    """Register one CPU memory arena for the process (ONNX Runtime's environment allocator), once;
    sessions made with `session.use_env_allocators` draw their activations from it instead of
    growing an arena each. An export is 6-7 sessions used one after another (vision encoder, then the
    decoder), so one arena sized for the largest of them is enough: on the 0.5b int4+w8a8 export the
    measured peak went from 2.46 to 2.36 GB (1.56x to 1.50x its weights), at the same speed
    (benchmarks/README.md, "AMD EPYC, 2 vCPUs, this round")."""
    global _shared_arena_ready
    with _shared_arena:
        if _shared_arena_ready:
            return
        # max_mem 0 (no limit), extend strategy 0 (next power of two: ONNX Runtime's default; 1,
        # same-as-requested, measured no smaller and slower), chunk sizes ONNX Runtime's defaults
        cfg = ort.OrtArenaCfg(0, 0, -1, -1)
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, cfg)
        _shared_arena_ready = True


def providers_for(device: str = "auto", providers: list | None = None) -> list:
    """Execution providers for `device`, or the caller's own list checked against this onnxruntime
    (it would only warn and fall back to CPU for one it lacks)."""
    ort = frameworks.startup("onnxruntime")
    available = ort.get_available_providers()
    if providers is not None:
        unknown = [p if isinstance(p, str) else p[0] for p in providers]
        unknown = [p for p in unknown if p not in available]
        if unknown:
            raise BackendUnavailable(
                f"execution provider(s) {', '.join(unknown)} not available in this onnxruntime; "
                f"available: {', '.join(available)}"
            )
        return [p if isinstance(p, str) else (p[0], p[1]) for p in providers]
    if device == "cuda":
        if CUDA not in available:
            raise BackendUnavailable(
                f"device='cuda' needs CUDAExecutionProvider, which this onnxruntime lacks "
                f"(available: {', '.join(available)}); install onnxruntime-gpu"
            )
        return [CUDA, CPU]
    if device == "auto" and CUDA in available:
        return [CUDA, CPU]
    if device not in DEVICES:
        raise InputError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    return [CPU]


def make_session(
    path: str | Path,
    device: str = "auto",
    threads: int | None = None,
    opt_level: str = "all",
    providers: list | None = None,
):
    """The one way an `onnxruntime.InferenceSession` is made here: options checked, the file's own
    errors a CheckpointError naming it, and device='cuda' really on CUDA (ONNX Runtime falls back
    to CPU with only a warning when the CUDA libraries do not load)."""
    check_session_options(threads, opt_level, device)
    ort = frameworks.startup("onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ONNX model {path} does not exist")
    so = session_options(threads, opt_level)
    chosen = providers_for(device, providers)
    if CUDA not in [p if isinstance(p, str) else p[0] for p in chosen]:
        share_cpu_arena(ort)
        so.add_session_config_entry("session.use_env_allocators", "1")
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=chosen)
    except Exception as e:
        # ONNX Runtime's own errors (bad protobuf, unsupported op...) do not always say which file;
        # anything else (MemoryError...) goes up unchanged
        if type(e).__module__.startswith("onnxruntime"):
            raise CheckpointError(f"ONNX Runtime could not load {path}: {e}") from None
        raise
    if device == "cuda" and CUDA not in session.get_providers():
        raise BackendUnavailable(
            f"device='cuda' was asked for {path.name}, but ONNX Runtime could not start "
            f"CUDAExecutionProvider here (session runs on {session.get_providers()})"
        )
    return session


def check_part_file(export_dir: Path, manifest: Manifest, part: str, variant: str | None = None) -> Path:
    """The part file (or its `variant`'s, F's prefill) exists, its data file too, and it was written
    by this export."""
    import onnx

    entry = manifest.parts[part]
    what = f"part {part}" if variant is None else f"part {part}'s {variant} variant"
    if variant is not None:
        entry = getattr(entry, variant)
    if entry.file is None:
        raise CheckpointError(f"{export_dir / 'manifest.json'}: entry parts.{part} names no ONNX file")
    path = export_dir / entry.file
    if not path.exists():
        raise CheckpointError(f"{path}: {what} ({manifest.parts[part].role}) is missing")
    if entry.data and not (export_dir / entry.data).exists():
        raise CheckpointError(f"{export_dir / entry.data}: weights of {what} ({path.name}) are missing")
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
    """The parts in ONNX Runtime. With `wrapper="torch"` (or jax, paddle, mindspore: the `X-ort`
    backends) every part runs through that framework's slimm.wrappers wrapper, its tensors going in
    and out, on the same one session per part."""

    name = "onnx"

    def __init__(
        self,
        export_dir,
        device: str = "auto",
        threads: int | None = None,
        opt_level: str = "all",
        wrapper: str | None = None,
    ) -> None:
        try:
            frameworks.startup("onnxruntime")
        except BackendUnavailable as e:
            raise BackendUnavailable(f"backend 'onnx' needs the 'onnxruntime' package ({e})") from None
        check_session_options(threads, opt_level, device)
        if wrapper is not None and wrapper not in frameworks.TENSOR_FRAMEWORKS:
            raise InputError(f"unknown wrapper {wrapper!r}; one of {', '.join(frameworks.TENSOR_FRAMEWORKS)}")
        export_dir = Path(export_dir)
        manifest = Manifest.read(export_dir)
        super().__init__(export_dir, manifest)
        # part -> session; "F.prefill" too when F has a prefill variant (a mixed-precision export)
        self.sessions = {}
        self.wrapped = {}
        files = [(part, None) for part in PARTS]
        if manifest.parts["F"].prefill is not None:
            files.append(("F", "prefill"))
        for part, variant in files:
            path = check_part_file(export_dir, manifest, part, variant)
            key = part if variant is None else f"{part}.{variant}"
            if wrapper is None:
                sess = make_session(path, device=device, threads=threads, opt_level=opt_level)
            else:
                from slimm.wrappers import WRAPPERS

                w = WRAPPERS[wrapper](
                    path, device=device, intra_op_num_threads=threads, graph_optimization_level=opt_level
                )
                self.wrapped[key], sess = w, w.session
            got = [i.name for i in sess.get_inputs()]
            want = [t.name for t in manifest.parts[part].inputs]
            if sorted(got) != sorted(want):
                raise CheckpointError(
                    f"{path}: inputs {got} do not match manifest.json's {want} for part {part}"
                )
            self.sessions[key] = sess
        self.wrapper = wrapper
        if wrapper is not None:
            self.framework = frameworks.get(wrapper)
            self.name = f"{wrapper}-ort"

    @classmethod
    def load(cls, path, device: str = "auto", threads: int | None = None, opt_level: str = "all", **kwargs):
        return cls(path, device=device, threads=threads, opt_level=opt_level, **kwargs)

    def run_part(self, part, feeds):
        key = part
        if part == "F" and "F.prefill" in self.sessions and feeds["inputs_embeds"].shape[1] > 1:
            key = "F.prefill"  # prompts: int8 GEMMs (w8a8); one-token decode steps: F's own weights
        if self.wrapper is None:
            return self.sessions[key].run(self.out_names[part], feeds)
        w = self.wrapped[key]
        outs = w.run_dict(
            **{k: w.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in feeds.items()}
        )
        return [outs[n] for n in self.out_names[part]]

    def to_numpy(self, x: Any) -> np.ndarray:
        if self.wrapper is None or isinstance(x, np.ndarray):
            return x
        return self.framework.to_numpy(x)
