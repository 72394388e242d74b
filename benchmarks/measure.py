"""What runs inside one benchmark subprocess: load one backend, time it on the shared workload,
report peak resident memory. Also the memory-bandwidth probe the decode roofline is computed from.

Every timing is wall clock (`time.perf_counter`) around a call that returns NumPy results, so
asynchronous frameworks have finished their work; the first call of each phase is a warm-up,
kept apart (its excess over the steady state is the one-off compile / first-run cost).
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from slimm.backends import BACKENDS
from slimm.frameworks import FRAMEWORKS as ALL_FRAMEWORKS
from slimm.frameworks import TARGETS

# each benchmarked backend -> the import name of the framework it needs (a missing one is a skipped
# row, not a crash): slimm's own backends from its registry, and transformers as the peer
FRAMEWORKS = {
    **{b: ALL_FRAMEWORKS[BACKENDS[b].framework].module for b in ("torch", "onnx", *TARGETS)},
    "transformers": "transformers",
}
PACKAGES = {  # the same backends -> the pip package whose version a report names
    **{b: ALL_FRAMEWORKS[BACKENDS[b].framework].package for b in ("torch", "onnx", *TARGETS)},
    "transformers": "transformers",
}
# the onnx backend on other exports of the same checkpoint, as rows of their own: the fused decoder
# (`slimm export --fused`) and with it an int8 KV cache (`--kv-cache int8`); -> export_model keywords
ONNX_EXPORTS = {"onnx-fused": {"fused": True}, "onnx-fused-kv8": {"fused": True, "kv_cache": "int8"}}
FRAMEWORKS.update({b: FRAMEWORKS["onnx"] for b in ONNX_EXPORTS})
PACKAGES.update({b: PACKAGES["onnx"] for b in ONNX_EXPORTS})
JIT_BACKENDS = TARGETS  # compile per input shape on the first call
PHASES = ("prefill", "decode", "vision", "ttft")


# ---- the workload every backend runs --------------------------------------------------------------------
def synthetic_image(height: int, width: int, seed: int = 0):
    """A seeded RGB image with smooth structure and noise (content does not change the cost)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
    img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img)


def build_workload(
    ckpt_dir: Path, out: Path, image_size: tuple[int, int], prompt_tokens: int, seed: int = 0
) -> Path:
    """The shared inputs, saved once: a `prompt_tokens`-token text prompt (seeded ordinary token
    ids) and one chat turn with one image, built by the checkpoint's own processor."""
    from slimm.processing import Processor

    proc = Processor.from_pretrained(ckpt_dir)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}
    ]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    image = proc(text=[text], images=[synthetic_image(*image_size, seed=seed)])
    ids = np.random.default_rng(seed).integers(1000, 150000, (1, prompt_tokens)).astype(np.int64)
    arrays = {f"image.{k}": np.asarray(v) for k, v in image.items()}
    arrays.update({"text.input_ids": ids, "text.attention_mask": np.ones_like(ids)})
    np.savez(out, **arrays)  # `out` ends in .npz, so NumPy keeps the name
    return out


def load_workload(path: Path) -> dict[str, dict[str, np.ndarray]]:
    with np.load(path) as z:
        out: dict[str, dict[str, np.ndarray]] = {"text": {}, "image": {}}
        for key in z.files:
            group, name = key.split(".", 1)
            out[group][name] = z[key]
    return out


# ---- runners: one shape for every backend --------------------------------------------------------------
class SlimmRunner:
    """A slimm backend: torch (its own vision tower) or one built on the exported parts."""

    def __init__(self, backend, path: Path) -> None:
        self.backend = backend
        self.name = backend.name
        self.path = path

    def weight_bytes(self) -> int:
        if hasattr(self.backend, "model"):  # torch: the parameters it computes with
            return sum(p.numel() * p.element_size() for p in self.backend.model.parameters())
        return artifact_bytes(self.path)

    def encode(self, pixels: np.ndarray, grid: np.ndarray) -> None:
        if hasattr(self.backend, "encode_visual"):
            self.backend.encode_visual(pixels, grid)
            return
        import torch

        with torch.no_grad():
            self.backend.model.visual.encode(torch.from_numpy(pixels), grid)

    def prefill(self, inputs, capacity):
        return self.backend.prefill(inputs, capacity)

    def decode(self, tokens):
        return self.backend.decode(tokens)


def artifact_bytes(model_dir: Path) -> int:
    """Bytes of the weight files a parts backend loads: ONNX parts and their data (F's prefill
    variant too), or the files a converted directory's manifest lists per part."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    total = 0
    for entry in manifest["parts"].values():
        names = entry.get("files") or [entry["file"], entry.get("data")]
        if entry.get("prefill"):  # a mixed-precision export's second F, loaded too
            names = [*names, entry["prefill"]["file"], entry["prefill"].get("data")]
        for name in names:
            path = model_dir / name if name else None
            if path is not None and path.is_file():
                total += path.stat().st_size
            elif path is not None and path.is_dir():  # e.g. MindSpore's split variables of a large graph
                total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return total


def load_runner(backend: str, path: Path, precision: str, threads: int):
    if backend == "transformers":
        import torch

        from benchmarks.peer import TransformersRunner

        torch.set_num_threads(threads)
        return TransformersRunner(path, dtype={"fp16": "float16"}.get(precision, "float32"))
    import slimm

    if backend == "torch":
        import torch

        torch.set_num_threads(threads)
        return SlimmRunner(
            slimm.load(path, backend="torch", dtype={"fp16": "float16"}.get(precision, "float32")), path
        )
    if backend == "onnx" or backend in ONNX_EXPORTS:
        return SlimmRunner(slimm.load(path, backend="onnx", device="cpu", threads=threads), path)
    if backend == "paddle":
        return SlimmRunner(slimm.load(path, backend="paddle", threads=threads), path)
    return SlimmRunner(slimm.load(path, backend=backend), path)


# ---- timing -------------------------------------------------------------------------------------------
def _timed(fn, *args) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def _phase(times: list[float]) -> dict[str, Any]:
    """First call apart; the median of the rest is the steady state."""
    steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {
        "first_s": times[0],
        "median_s": steady,
        "times_s": times,
        "warmup_excess_s": max(0.0, times[0] - steady),
    }


def run_measurements(
    runner, work: dict, decode_steps: int, repeats: int, res: dict, save, logits_path: str | None = None
) -> None:
    """Fill `res` phase by phase, calling `save()` after each: a process killed later (out of
    memory) still reports what it measured. Text prefill and decode come first: they need the
    LLM only; the vision encoder's phases follow."""
    text, image = work["text"], work["image"]
    P = text["input_ids"].shape[1]
    L = image["input_ids"].shape[1]
    res.update(prompt_tokens=P, image_prompt_tokens=L, decode_steps=decode_steps)

    res["phase"] = "prefill"
    save()
    res["prefill"] = _phase(
        [_timed(runner.prefill, text, P + decode_steps + 1)[0] for _ in range(repeats + 1)]
    )
    res["prefill"]["tokens_per_s"] = P / res["prefill"]["median_s"]
    save()

    # greedy decode after the last text prefill; every backend runs exactly decode_steps steps
    res["phase"] = "decode"
    save()
    logits = runner.prefill(text, P + decode_steps + 1)
    if logits_path:  # the parent compares every row's logits with fp32's (quantization error)
        np.save(logits_path, np.asarray(logits, np.float32))
    token = logits.argmax(-1).astype(np.int64)
    tokens, steps = [int(token[0])], []
    for _ in range(decode_steps):
        dt, logits = _timed(runner.decode, token)
        token = logits.argmax(-1).astype(np.int64)
        steps.append(dt)
        tokens.append(int(token[0]))
    res["decode"] = _phase(steps)
    res["decode"]["tokens_per_s"] = 1.0 / res["decode"]["median_s"]
    res["tokens"] = tokens
    save()

    res["phase"] = "vision encode"
    save()
    pixels, grid = image["pixel_values"], image["image_grid_thw"]
    res["vision"] = _phase([_timed(runner.encode, pixels, grid)[0] for _ in range(repeats + 1)])
    res["vision"]["patches"] = int(pixels.shape[0])
    save()

    res["phase"] = "time to first token"
    save()
    ttft = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        runner.prefill(image, L + decode_steps + 1).argmax(-1)
        ttft.append(time.perf_counter() - t)
    res["ttft"] = _phase(ttft)
    res["compile_s"] = sum(res[k]["warmup_excess_s"] for k in PHASES)
    del res["phase"]


def worker(spec: dict[str, Any], result_path: str) -> None:
    """Entry point of a benchmark subprocess: measure one backend, write JSON to `result_path`
    (after every phase, so that a parent finds what was measured even if this process is killed)."""
    import traceback

    out: dict[str, Any] = {"backend": spec["backend"], "precision": spec["precision"], "status": "running"}

    def save() -> None:
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        tmp = Path(result_path + ".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(result_path)

    try:
        out["phase"] = "load"
        t0 = time.perf_counter()
        runner = load_runner(spec["backend"], Path(spec["path"]), spec["precision"], spec["threads"])
        out["load_s"] = time.perf_counter() - t0
        out["weight_bytes"] = runner.weight_bytes()
        save()
        work = load_workload(Path(spec["workload"]))
        run_measurements(
            runner, work, spec["decode_steps"], spec["repeats"], out, save, spec.get("logits_path")
        )
        out["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - any failure becomes a row that says why
        out["status"] = "failed"
        out["reason"] = f"{type(e).__name__} in {out.get('phase')}: {e}".splitlines()[0][:300]
        out["traceback"] = traceback.format_exc()
    save()  # peak memory read here, before the bandwidth probe below allocates anything
    if "decode" in out:
        # the machine's speed drifts with its neighbours' load: each row's roofline uses the
        # bandwidth measured in its own process, right after its measurements
        out["decode"]["read_bandwidth_bytes_per_s"] = read_bandwidth(0.5, spec["threads"], 3)
        Path(result_path).write_text(json.dumps(out))  # peak memory as saved above


# ---- the roofline's bandwidth --------------------------------------------------------------------------
def read_bandwidth(gib: float = 1.0, threads: int = 2, repeats: int = 5) -> float:
    """Sustained read bandwidth, bytes/s, over one float32 array far larger than any cache: best of
    a matrix-vector product (decode's own access pattern; BLAS uses the threads the environment
    allows) and `threads` threads each taking the max of their share (NumPy releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(int(gib * 2**30) // 4, np.float32)  # written once: every page is resident
    matrix, x = a.reshape(-1, 1024), np.ones(1024, np.float32)
    chunks = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            matrix @ x
            best = min(best, time.perf_counter() - t)
            t = time.perf_counter()
            list(pool.map(np.max, chunks))
            best = min(best, time.perf_counter() - t)
    return a.nbytes / best


def bandwidth_worker(spec: dict[str, Any], result_path: str) -> None:
    bw = read_bandwidth(spec.get("gib", 1.0), spec["threads"])
    Path(result_path).write_text(json.dumps({"read_bandwidth_bytes_per_s": bw}))
