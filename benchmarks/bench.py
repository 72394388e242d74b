"""`slimm bench`: build (or reuse) a random-weight checkpoint, its ONNX export, quantized copies and
framework conversions, then time every backend on the same inputs, one subprocess per backend.

Writes table.md, results.json and chart.png to --out; see benchmarks/README.md for what each
column measures and how.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import peers
from benchmarks.measure import FRAMEWORKS, ONNX_EXPORTS, PACKAGES, PHASES
from slimm.errors import InputError
from slimm.export.quantize import BLOCK_SIZE, BLOCKED, MIXED, WEIGHT_ONLY, check_block_size
from slimm.export.quantize import PRECISIONS as QUANTIZED

SIZES = ("tiny", "0.5b", "2b")
VARIANTS = ("plain", "v1", "midlayers", "efficient")
BACKENDS = tuple(FRAMEWORKS)  # torch, onnx, jax, paddle, mindspore, transformers, onnx-fused, ...
DEFAULT_BACKENDS = [b for b in BACKENDS if b not in ONNX_EXPORTS]
PRECISIONS = ("fp32", "fp16", *QUANTIZED)
FLOAT_BYTES = {"fp32": 4, "fp16": 2}  # bytes per weight of the unquantized precisions
CONVERTED = ("jax", "paddle", "mindspore")


def default_work_dir() -> Path:
    from slimm.cache import cache_dir

    return cache_dir() / "bench"


def _choices(kind: str, allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(bad) or repr(text)}; choose from {', '.join(allowed)} (comma-separated)"
            )
        return list(dict.fromkeys(items))

    return parse


def _image_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size {text!r} is not HEIGHTxWIDTH, e.g. 448x448") from None
    if h < 28 or w < 28:
        raise argparse.ArgumentTypeError(f"image size {text!r}: each side must be at least 28 pixels")
    return h, w


def _block_size(text: str) -> int:
    n = _positive(text)
    try:
        check_block_size(n)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return n


def _nonnegative(text: str) -> int:
    return 0 if text.strip() == "0" else _positive(text)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options, for `slimm bench` and `python -m benchmarks.bench`."""
    p.add_argument("--size", default="tiny", choices=SIZES, help="checkpoint size (random weights)")
    p.add_argument("--variant", default="plain", choices=VARIANTS, help="DeepStack variant")
    p.add_argument(
        "--backends",
        type=_choices("backend", BACKENDS),
        default=DEFAULT_BACKENDS,
        help=f"comma-separated, from {','.join(BACKENDS)}; onnx-fused / onnx-fused-kv8: ONNX Runtime on an export "
        f"with --fused (and --kv-cache int8) (default: {','.join(DEFAULT_BACKENDS)})",
    )
    p.add_argument(
        "--precision",
        type=_choices("precision", PRECISIONS),
        default=["fp32"],
        help=f"comma-separated, from {','.join(PRECISIONS)} (all but fp32 / fp16: ONNX Runtime only)",
    )
    p.add_argument(
        "--peers",
        type=_choices("peer", tuple(peers.ENGINES)),
        default=[],
        help=f"comma-separated, from {','.join(peers.ENGINES)}: other engines on the same language model, "
        "text only, at the requested precisions they have (default: none)",
    )
    p.add_argument(
        "--peer-python",
        default=sys.executable,
        metavar="PATH",
        help="the Python the peers are installed in (default: this one)",
    )
    p.add_argument(
        "--block-size",
        type=_block_size,
        default=BLOCK_SIZE,
        metavar="N",
        help=f"int8 / int4 weights per scale, in the mixed +w8a8 precisions too (default {BLOCK_SIZE})",
    )
    p.add_argument(
        "--image-size",
        type=_image_size,
        default=(448, 448),
        metavar="HxW",
        help="the benchmark image (default 448x448)",
    )
    p.add_argument("--prompt-tokens", type=_positive, default=256, help="text prompt length for prefill")
    p.add_argument("--decode-steps", type=_positive, default=32, help="greedy decode steps (eos disabled)")
    p.add_argument("--repeats", type=_positive, default=3, help="timed calls per phase after a warm-up")
    p.add_argument("--threads", type=_positive, default=2, help="intra-op threads for every framework")
    p.add_argument(
        "--rounds",
        type=_positive,
        default=1,
        help="measure every backend this many times, round-robin, each in a fresh process; "
        "per phase the best round is kept (for shared, noisy machines)",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="cache of checkpoints / exports / conversions, reused across runs "
        "(default: $SLIMM_CACHE/bench or ~/.cache/slimm/bench)",
    )
    p.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="table.md, results.json, chart.png"
    )
    p.add_argument(
        "--convert-timeout",
        type=_positive,
        default=900,
        help="seconds one framework conversion may take before its backend is skipped",
    )
    p.add_argument(
        "--timeout", type=_positive, default=1800, help="seconds one backend's measurement may take"
    )
    p.add_argument(
        "--prepare-only",
        action="store_true",
        help="build (or check) every checkpoint, export and conversion the run needs, then stop",
    )
    p.add_argument(
        "--accuracy",
        type=_nonnegative,
        default=0,
        metavar="N",
        help="also answer N held-out questions of the trained demo model at each row's backend and "
        "precision (not timed; its exports at the default block size) for a demo-model accuracy column "
        "(default 0: no column)",
    )
    p.add_argument(
        "--memory-limit",
        type=float,
        default=None,
        metavar="GB",
        help="stop a backend whose resident memory passes this (default: 90%% of the memory "
        "available at start)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimm bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return p


# ---- subprocesses ---------------------------------------------------------------------------------------
def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def run_isolated(
    target,
    spec: dict[str, Any],
    timeout: float,
    env: dict[str, str] | None = None,
    memory_limit: int | None = None,
) -> dict:
    """Run `target(spec, result_path)` in a fresh (spawned) process; its JSON result, or a failure
    naming the exit status / the timeout / the memory limit. A fresh process per job keeps peak
    memory its own; the limit stops a runaway job before the kernel's OOM killer picks a victim
    on a shared machine."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="slimm-bench-") as tmp:
        result = Path(tmp) / "result.json"
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})  # a spawned child starts from the parent's environment
        try:
            proc = ctx.Process(target=target, args=(spec, str(result)), daemon=True)
            proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        over = _watch(proc.pid, proc.is_alive, proc.join, proc.kill, timeout, memory_limit)
        if over == "timeout":
            return {"status": "timeout", "reason": f"took more than {timeout:.0f} s"}
        return _collect(result, over, proc.exitcode)


def run_command(
    cmd: list[str], timeout: float, env: dict[str, str] | None = None, memory_limit: int | None = None
) -> dict:
    """As `run_isolated`, for a command in another Python (a peer's): it is given `--result PATH`
    and writes its JSON there. When it leaves no result, the last line of its stderr is the reason."""
    with tempfile.TemporaryDirectory(prefix="slimm-bench-") as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "stderr.txt"
        with open(log, "w") as err:
            proc = subprocess.Popen(
                [*cmd, "--result", str(result)],
                env={**os.environ, **(env or {})},
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # its own process group: a kill reaches the builder it runs too
            )

            def kill() -> None:
                try:
                    os.killpg(proc.pid, 9)
                except ProcessLookupError:
                    pass

            def wait(seconds: float) -> None:
                try:
                    proc.wait(seconds)
                except subprocess.TimeoutExpired:
                    pass

            over = _watch(proc.pid, lambda: proc.poll() is None, wait, kill, timeout, memory_limit)
        if over == "timeout":
            return {"status": "timeout", "reason": f"took more than {timeout:.0f} s"}
        out = _collect(result, over, proc.returncode)
        if not result.exists():
            lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
            out["reason"] += f": {lines[-1][:300]}" if lines else ""
        return out


def _watch(pid: int, alive, join, kill, timeout: float, memory_limit: int | None) -> str | None:
    """Wait for a process; "timeout" if it ran past `timeout` (then killed), the memory-limit note
    if it was stopped for that, else None."""
    start, over = time.monotonic(), None
    while alive() and time.monotonic() - start < timeout:
        join(0.25)
        if memory_limit and alive() and _rss(pid) > memory_limit:
            over = f"stopped at the memory limit ({memory_limit / 1e9:.1f} GB resident)"
            kill()
    if alive():
        kill()
        join(None)
        return "timeout"
    join(None)
    return over


def _collect(result: Path, over: str | None, exitcode: int | None) -> dict:
    died = over or f"process exited with status {exitcode}" + (
        " (killed: out of memory?)" if exitcode == -9 else ""
    )
    if result.exists():
        out = json.loads(result.read_text())
        if out.get("status") == "running":  # killed mid-way: keep what it had measured
            out.update(status="failed", reason=f"{died} during {out.get('phase')}")
        return out
    return {"status": "failed", "reason": died}


def thread_env(threads: int) -> dict[str, str]:
    n = str(threads)
    return {
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "XLA_FLAGS": f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={n}",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "GLOG_minloglevel": "2",
    }


# ---- artefacts (built in subprocesses, cached in --work) ------------------------------------------------
def build_worker(spec: dict[str, Any], result_path: str) -> None:
    """Subprocess body: write one artefact (`spec['kind']`) into `spec['tmp']`, which the parent
    renames into place once this succeeds."""
    import traceback

    kind = spec["kind"]
    try:
        if kind == "checkpoint":
            from slimm.demo import write_demo_checkpoint

            write_demo_checkpoint(spec["tmp"], variant=spec["variant"], size=spec["size"])
        elif kind == "export":
            from slimm.export import export_model

            export_model(
                spec["src"],
                spec["tmp"],
                precision=spec["precision"],
                progress=False,
                **ONNX_EXPORTS.get(spec.get("backend"), {}),
            )
        elif kind == "quantize":
            from slimm.export.quantize import quantize_export

            quantize_export(
                spec["src"], spec["tmp"], spec["precision"], block_size=spec["block_size"], progress=False
            )
        elif kind == "convert":
            from slimm.convert.driver import convert_export

            convert_export(spec["src"], spec["target"], spec["tmp"], progress=False)
        elif kind == "hf-llm":
            peers.write_hf_llm(spec["src"], spec["tmp"])
        elif kind == "workload":
            from benchmarks.measure import build_workload

            build_workload(
                Path(spec["src"]), Path(spec["tmp"]), tuple(spec["image_size"]), spec["prompt_tokens"]
            )
        else:
            raise ValueError(f"unknown artefact kind {kind!r}")
        out = {"status": "ok"}
    except Exception as e:  # noqa: BLE001 - reported as the reason a backend is skipped
        out = {
            "status": "failed",
            "reason": f"{type(e).__name__}: {e}".splitlines()[0][:300],
            "traceback": traceback.format_exc(),
        }
    Path(result_path).write_text(json.dumps(out))


class Artefacts:
    """Paths in the --work cache; each is built once, into a temporary name renamed at the end, so
    an interrupted build is never mistaken for a finished one."""

    def __init__(self, work: Path, variant: str, size: str, args) -> None:
        self.work, self.variant, self.size, self.args = work, variant, size, args
        self.failed: dict[str, str] = {}

    def path(self, what: str, precision: str | None = None) -> Path:
        tag = f"{self.variant}-{self.size}" + (f"-{precision}" if precision else "")
        if precision in BLOCKED and self.args.block_size != BLOCK_SIZE:
            tag += f"-b{self.args.block_size}"
        return self.work / f"{what}-{tag}"

    def workload_path(self) -> Path:
        h, w = self.args.image_size
        return self.work / f"inputs-{self.variant}-{self.size}-{h}x{w}-{self.args.prompt_tokens}.npz"

    def ensure(
        self, kind: str, dest: Path, spec: dict[str, Any], timeout: float, python: str | None = None
    ) -> Path | None:
        """`dest`, built now unless it exists; None (the reason in `failed`) if its build failed.
        With `python`, the build is a peer worker command (`benchmarks/peer_worker.py KIND`) run there."""
        key = str(dest)
        if key in self.failed:
            return None
        if dest.exists():
            return dest
        tmp = dest.with_name("tmp-" + dest.name)
        if tmp.is_dir():
            shutil.rmtree(tmp)
        tmp.unlink(missing_ok=True)
        t = time.perf_counter()
        job = {**spec, "kind": kind, "tmp": str(tmp)}
        if python is None:
            res = run_isolated(build_worker, job, timeout, thread_env(self.args.threads))
        else:
            res = run_command(peers.command(python, kind, job), timeout, thread_env(self.args.threads))
        if res.get("status") != "ok":
            self.failed[key] = f"{kind} failed: {res.get('reason')}"
            if res.get("traceback"):
                print(res["traceback"], file=sys.stderr)
            return None
        tmp.rename(dest)
        print(f"  built {dest.name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        return dest


# ---- planning -------------------------------------------------------------------------------------------
def skip_reason(backend: str, precision: str, variant: str) -> str | None:
    """Why a (backend, precision) row cannot run here, or None."""
    if importlib.util.find_spec(FRAMEWORKS[backend]) is None:
        return f"{FRAMEWORKS[backend]} is not installed"
    if backend == "transformers" and variant != "plain":
        return f"transformers' Qwen2-VL has no DeepStack ({variant}): the peer runs the plain variant only"
    if backend in ONNX_EXPORTS and precision == "fp16":
        return "the fused decoder has no fp16 form (slimm export --fused refuses it)"
    if backend in ONNX_EXPORTS:
        return None
    if precision in WEIGHT_ONLY and backend != "onnx":
        return f"{precision} is ONNX Runtime weight-only quantization (MatMulNBits): ONNX Runtime only"
    if precision in MIXED and backend != "onnx":
        return f"{precision} is ONNX Runtime quantization (MatMulNBits and MatMulInteger): ONNX Runtime only"
    if precision in QUANTIZED and backend != "onnx":
        return f"{precision} is ONNX Runtime dynamic quantization (MatMulInteger): ONNX Runtime only"
    return None


def model_path(
    art: Artefacts, backend: str, precision: str, timeout: float
) -> tuple[Path | None, str | None]:
    """Build what `backend` at `precision` loads; (path, None) or (None, why not)."""
    args = art.args
    ckpt = art.ensure("checkpoint", art.path("ckpt"), {"variant": art.variant, "size": art.size}, 3600)
    if ckpt is None:
        return None, art.failed[str(art.path("ckpt"))]
    if backend in ("torch", "transformers"):
        return ckpt, None
    export_precision = "fp32" if precision in QUANTIZED else precision
    kind = backend if backend in ONNX_EXPORTS else "onnx"  # which export: the plain one, or fused
    spec = {"src": str(ckpt), "precision": export_precision, "backend": kind}
    export = art.ensure("export", art.path(kind, export_precision), spec, 3600)
    if export is None:
        return None, art.failed[str(art.path(kind, export_precision))]
    if precision in QUANTIZED:  # w8a8's block size is its embedding table's: kept at the default
        block = args.block_size if precision in BLOCKED else BLOCK_SIZE
        q = art.ensure(
            "quantize",
            art.path(kind, precision),
            {"src": str(export), "precision": precision, "block_size": block},
            3600,
        )
        return (q, None) if q else (None, art.failed[str(art.path(kind, precision))])
    if backend == "onnx" or backend in ONNX_EXPORTS:
        return export, None
    dest = art.path(backend, precision)
    out = art.ensure("convert", dest, {"src": str(export), "target": backend}, args.convert_timeout)
    return (out, None) if out else (None, art.failed[str(dest)])


def peer_model_path(art: Artefacts, engine: str, precision: str) -> tuple[Path | None, str | None]:
    """Build what a peer loads at `precision`: the checkpoint's language model in Hugging Face format,
    then onnxruntime-genai's model builder on it, or its f32 GGUF and llama.cpp's quantization of it."""
    args, python = art.args, art.args.peer_python
    ckpt = art.ensure("checkpoint", art.path("ckpt"), {"variant": art.variant, "size": art.size}, 3600)
    if ckpt is None:
        return None, art.failed[str(art.path("ckpt"))]
    hf = art.ensure("hf-llm", art.path("hf"), {"src": str(ckpt)}, 3600)
    if hf is None:
        return None, art.failed[str(art.path("hf"))]
    fmt = peers.ENGINES[engine][precision]
    timeout = args.convert_timeout
    if engine == "onnxruntime-genai":
        dest = art.path("ortgenai", precision)
        spec = {"src": str(hf), "precision": fmt, "block_size": args.block_size, "timeout": timeout}
        out = art.ensure("ortgenai", dest, spec, timeout, python)
        return (out, None) if out else (None, art.failed[str(dest)])
    f32 = art.path("gguf", "f32")
    f32 = f32.with_name(f32.name + ".gguf")
    if art.ensure("gguf", f32, {"src": str(hf)}, timeout, python) is None:
        return None, art.failed[str(f32)]
    if fmt == "f32":
        return f32, None
    dest = art.path("gguf", fmt)
    dest = dest.with_name(dest.name + ".gguf")
    spec = {"src": str(f32), "format": fmt, "threads": args.threads}
    out = art.ensure("quantize", dest, spec, timeout, python)
    return (out, None) if out else (None, art.failed[str(dest)])


def decode_bytes(export_dir: Path) -> int:
    """Bytes of weights one decode step reads: every initializer of part F (decoder layers, final
    norm, lm_head); the embedding row read from part A is left out."""
    import onnx

    model = onnx.load(str(export_dir / "SliMM_F.onnx"), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        if "length" in ext:
            total += int(ext["length"])
        else:
            total += len(init.raw_data) or len(onnx.numpy_helper.to_array(init).tobytes())
    return total


def checkpoint_decode_bytes(ckpt: Path, precision: str) -> int:
    """What `decode_bytes` counts, from the checkpoint's shapes at a float `precision`: the decoder
    layers, the final norm and the output projection (the tied embedding when there is no lm_head).
    A torch-only run needs no export for its roofline."""
    import torch

    from slimm.config import load_config
    from slimm.model.slimm import SliMMForConditionalGeneration

    with torch.device("meta"):
        m = SliMMForConditionalGeneration(load_config(ckpt))
    llm = [*m.model.layers.parameters(), *m.model.norm.parameters(), m.output_weight()]
    return sum(p.numel() for p in llm) * FLOAT_BYTES[precision]


def machine_line(threads: int) -> str:
    import numpy as np

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(
            next(
                x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")
            ).split()[1]
        )
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores{mem}; {threads} threads; Python {platform.python_version()}, "
        f"NumPy {np.__version__}, {platform.system()} {platform.release()}"
    )


def versions(backends: list[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for b in backends:
        try:
            out[PACKAGES[b]] = version(PACKAGES[b])
        except PackageNotFoundError:
            pass
    return out


def logits_error(results: list[dict[str, Any]], logits_dir: Path) -> None:
    """Each measured row's text-prefill logits against fp32's (torch's, else ONNX Runtime's), as
    max |logits - fp32| / max |fp32|: the quantization error of int8 / int4 / w8a8 rows, ~1e-6 elsewhere."""
    import numpy as np

    def load(backend: str, precision: str):
        f = logits_dir / f"{backend}-{precision}.npy"
        return np.load(f) if f.exists() else None

    ref = load("torch", "fp32")
    ref_name = "torch fp32"
    if ref is None:
        ref, ref_name = load("onnx", "fp32"), "onnx fp32"
    if ref is None:
        return
    for r in results:
        got = load(r["backend"], r["precision"])
        if got is not None and "decode" in r and got.shape == ref.shape:
            r["logits_error"] = float(np.abs(got - ref).max() / np.abs(ref).max())
            r["logits_reference"] = ref_name


def demo_accuracy(results: list[dict[str, Any]], n: int) -> None:
    """`demo_accuracy` for every measured row that benchmarks.accuracy has: the trained demo model at
    the row's backend and precision on `n` held-out questions, against torch fp32."""
    from benchmarks import accuracy

    chosen = [
        r
        for r in results
        if not r.get("peer") and "load_s" in r and (r["backend"], r["precision"]) in accuracy.ROWS
    ]
    if not chosen:
        return
    keys = list(dict.fromkeys([("torch", "fp32")] + [(r["backend"], r["precision"]) for r in chosen]))
    print(f"demo-model accuracy: {n} held-out questions for {len(keys)} rows", file=sys.stderr)
    reports = {(x["backend"], x["precision"]): x for x in accuracy.measure(keys, n)}
    for r in chosen:
        x = reports[(r["backend"], r["precision"])]
        r["demo_accuracy"] = {k: x[k] for k in ("accuracy", "n", "delta_points", "identical")}


def load_text_ids(workload: Path) -> list[int]:
    """The text prompt's token ids, as the peers take them."""
    import numpy as np

    with np.load(workload) as z:
        return [int(t) for t in z["text.input_ids"][0]]


def merge_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from several rounds of the same backend: per phase the round with the lowest
    median (the least disturbed by the machine's other load), the highest peak memory."""
    ok = [r for r in runs if r.get("status") == "ok"] or [r for r in runs if "load_s" in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    for phase in PHASES:
        done = [r[phase] for r in ok if phase in r]
        if done:
            out[phase] = min(done, key=lambda p: p["median_s"])
    for key in ("compile_s", "load_s"):
        if all(key in r for r in ok):
            out[key] = min(r[key] for r in ok)
    out["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in ok)
    out["rounds"] = len(ok)
    return out


# ---- the run --------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from benchmarks import report
    from benchmarks.measure import bandwidth_worker, worker

    work = (args.work or default_work_dir()).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    art = Artefacts(work, args.variant, args.size, args)
    # per precision slimm's backends then the peers: rounds alternate between them
    peer_rows = peers.rows(args.peers, args.precision)
    rows = [(b, p) for p in args.precision for b in args.backends + [e for e, q in peer_rows if q == p]]
    results: list[dict[str, Any]] = []
    bar = tqdm(total=2 + len(rows) * (1 + args.rounds), desc="bench", unit="step", file=sys.stderr)

    bar.set_postfix_str("checkpoint and inputs")
    ckpt = art.ensure("checkpoint", art.path("ckpt"), {"variant": args.variant, "size": args.size}, 3600)
    if ckpt is None:
        print(f"error: {art.failed[str(art.path('ckpt'))]}", file=sys.stderr)
        return 2
    workload = art.ensure(
        "workload",
        art.workload_path(),
        {"src": str(ckpt), "image_size": list(args.image_size), "prompt_tokens": args.prompt_tokens},
        600,
    )
    if workload is None:
        print(f"error: {art.failed[str(art.workload_path())]}", file=sys.stderr)
        return 2
    bar.update(1)

    # build everything first, so that no build runs beside a measurement
    plan = []
    probed = {e: peers.probe(e, args.peer_python) for e in args.peers}
    for backend, precision in rows:
        bar.set_postfix_str(f"prepare {backend} {precision}")
        path = None
        if backend in peers.ENGINES:
            ok = probed[backend]["status"] == "ok"
            reason = None if ok else peers.unavailable(backend, probed[backend], args.peer_python)
            if ok:
                path, reason = peer_model_path(art, backend, precision)
        else:
            reason = skip_reason(backend, precision, args.variant)
            if reason is None:
                path, reason = model_path(art, backend, precision, args.convert_timeout)
        plan.append((backend, precision, path, reason))
        bar.update(1)
    if args.prepare_only:
        bar.close()
        for backend, precision, path, reason in plan:
            print(f"{backend} {precision}: {path if reason is None else reason}")
        return 0

    bar.set_postfix_str("memory bandwidth")
    bw = run_isolated(bandwidth_worker, {"threads": args.threads}, 600, thread_env(args.threads))
    bandwidth = bw.get("read_bandwidth_bytes_per_s")
    bar.update(1)

    avail = available_memory()
    memory_limit = (
        int(args.memory_limit * 1e9) if args.memory_limit else (int(0.9 * avail) if avail else None)
    )
    runs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(plan))}
    for rnd in range(args.rounds):
        for i, (backend, precision, path, reason) in enumerate(plan):
            bar.set_postfix_str(
                f"measure {backend} {precision}" + (f" (round {rnd + 1})" if args.rounds > 1 else "")
            )
            if reason is not None:
                if rnd == 0:
                    runs[i].append({"status": "skipped", "reason": reason})
                bar.update(1)
                continue
            logits_dir = args.out / "logits"
            logits_dir.mkdir(parents=True, exist_ok=True)
            spec = {
                "backend": backend,
                "precision": precision,
                "path": str(path),
                "workload": str(workload),
                "threads": args.threads,
                "decode_steps": args.decode_steps,
                "repeats": args.repeats,
                "logits_path": str(logits_dir / f"{backend}-{precision}.npy"),
            }
            if backend in peers.ENGINES:
                work_inputs = load_text_ids(workload)
                peer_spec = {**spec, "engine": backend, "input_ids": work_inputs}
                cmd = peers.command(args.peer_python, "measure", peer_spec)
                res = run_command(cmd, args.timeout, thread_env(args.threads), memory_limit)
            else:
                res = run_isolated(worker, spec, args.timeout, thread_env(args.threads), memory_limit)
            if res.get("status") == "failed" and res.get("traceback"):
                print(f"\n{backend} {precision} failed:\n{res['traceback']}", file=sys.stderr)
            runs[i].append(res)
            bar.update(1)

    step_bytes: dict[str, int] = {}
    for i, (backend, precision, path, _) in enumerate(plan):
        row: dict[str, Any] = {"backend": backend, "precision": precision, **merge_rounds(runs[i])}
        if path is not None:
            row["path"] = str(path)
        if backend in peers.ENGINES:  # text only, in its own format: no roofline from slimm's bytes
            row.update(peer=True, format=peers.ENGINES[backend][precision])
            results.append(row)
            continue
        # the roofline: bytes of decoder + lm_head weights one step reads at this precision
        if "decode" in row:
            if precision not in step_bytes:
                src = art.path("onnx", precision)
                if src.exists():
                    step_bytes[precision] = decode_bytes(src)
                elif precision in FLOAT_BYTES:  # no export needed: the checkpoint's shapes say it
                    step_bytes[precision] = checkpoint_decode_bytes(art.path("ckpt"), precision)
                else:
                    src = model_path(art, "onnx", precision, args.convert_timeout)[0]
                    step_bytes[precision] = decode_bytes(src) if src else 0
            row["decode_bytes_per_step"] = step_bytes[precision] or None
            row_bw = row["decode"].get("read_bandwidth_bytes_per_s") or bandwidth
            if row_bw and step_bytes[precision]:
                row["roofline_tokens_per_s"] = row_bw / step_bytes[precision]
                row["roofline_fraction"] = row["decode"]["tokens_per_s"] / row["roofline_tokens_per_s"]
        results.append(row)
    bar.close()

    meta = {
        "machine": machine_line(args.threads),
        "versions": {
            **versions(args.backends),
            **{e: r["version"] for e, r in probed.items() if r["status"] == "ok"},
        },
        "read_bandwidth_bytes_per_s": bandwidth,
        "size": args.size,
        "variant": args.variant,
        "image_size": list(args.image_size),
        "prompt_tokens": args.prompt_tokens,
        "decode_steps": args.decode_steps,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "threads": args.threads,
        "block_size": args.block_size,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    logits_error(results, args.out / "logits")
    if args.accuracy:
        demo_accuracy(results, args.accuracy)
        meta["accuracy_questions"] = args.accuracy
    report.compare(results)
    args.out.mkdir(parents=True, exist_ok=True)
    text = report.markdown(meta, results)
    print(text)
    (args.out / "table.md").write_text(text)
    clean = [{k: v for k, v in r.items() if k != "traceback"} for r in results]
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": clean}, indent=2))
    note = report.chart(meta, results, args.out / "chart.png")
    print(note, file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
