"""Where ONNX Runtime's decode step spends its time: per part (A, E, F and the host's cache
writes), then inside F by operator type and by node, from ONNX Runtime's own profiler run on the
very inputs of a real decode step.

    python -m benchmarks.profile_ort EXPORT_DIR [--prompt-tokens 256] [--steps 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def per_part(backend, prompt_tokens: int, steps: int, seed: int = 0) -> tuple[dict[str, float], float, dict]:
    """Mean ms per decode step of each part and of the host's cache writes; also the feeds of
    the last F call, to replay under the profiler."""
    ids = np.random.default_rng(seed).integers(1000, 150000, (1, prompt_tokens)).astype(np.int64)
    logits = backend.prefill(
        {"input_ids": ids, "attention_mask": np.ones_like(ids)}, prompt_tokens + steps + 2
    )
    spent: dict[str, float] = collections.defaultdict(float)
    last: dict = {}
    run_part, write_cache = backend.run_part, backend.write_cache

    def timed_part(part, feeds):
        t = time.perf_counter()
        out = run_part(part, feeds)
        spent[part] += time.perf_counter() - t
        if part == "F":
            last["feeds"] = feeds  # copied once, after the timed steps (a copy here would be timed)
        return out

    def timed_write(*args):
        t = time.perf_counter()
        write_cache(*args)
        spent["host: KV cache write"] += time.perf_counter() - t

    backend.run_part, backend.write_cache = timed_part, timed_write
    token = logits.argmax(-1)
    token = backend.decode(token).argmax(-1)  # warm-up step, not counted
    spent.clear()
    t0 = time.perf_counter()
    for _ in range(steps):
        token = backend.decode(token).argmax(-1)
    total = (time.perf_counter() - t0) / steps
    # the last step's feeds (the cache buffers as they are now: one more slot filled, same shapes)
    feeds = {k: np.array(v, copy=True) for k, v in last["feeds"].items()}
    return {k: 1e3 * v / steps for k, v in spent.items()}, 1e3 * total, feeds


def profile_f(path: Path, feeds: dict, threads: int, runs: int = 10) -> tuple[list, list, float]:
    """ONNX Runtime's profiler over `runs` calls of a part (F, or B with --vision): (op type,
    ms/run, count/run) and the top nodes, and the summed kernel ms per run."""
    import onnxruntime as ort

    from slimm.backends.onnx import session_options

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(threads, "all")
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "f")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)  # warm-up
        for _ in range(runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    by_node: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            by_op[op] += e["dur"]
            count[op] += 1
            by_node[f"{e['name'][: -len('_kernel_time')]} ({op})"] += e["dur"]
    n = runs + 1
    total = sum(by_op.values()) / n / 1e3
    ops = sorted(((op, d / n / 1e3, count[op] // n) for op, d in by_op.items()), key=lambda x: -x[1])
    nodes = sorted(((k, d / n / 1e3) for k, d in by_node.items()), key=lambda x: -x[1])
    return ops, nodes, total


def print_ops(ops: list, nodes: list, kernels: float, top: int) -> None:
    print("\n| op type | ms/call | share | kernels/call |\n| --- | ---: | ---: | ---: |")
    for op, ms, c in ops[:top]:
        print(f"| {op} | {ms:.2f} | {100 * ms / kernels:.1f}% | {c} |")
    rest = sum(ms for _, ms, _ in ops[top:])
    print(f"| other | {rest:.2f} | {100 * rest / kernels:.1f}% | |")
    print("\n| slowest nodes | ms/call |\n| --- | ---: |")
    for name, ms in nodes[:5]:
        print(f"| {name} | {ms:.2f} |")


def profile_vision(backend, args) -> int:
    """Part B on one synthetic image, through ONNX Runtime's profiler (3 calls after a warm-up)."""
    from benchmarks.measure import synthetic_image
    from slimm.host.vision_index import vision_host_inputs

    h, w = (int(x) for x in args.vision.lower().split("x"))
    cfg = backend.config
    inp = backend.processor(
        text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[synthetic_image(h, w)]
    )
    feeds = {
        "pixel_values": inp["pixel_values"].astype(np.float32),
        **vision_host_inputs(cfg.deepstack_type, cfg.spatial_merge_size, inp["image_grid_thw"]),
    }
    ops, nodes, kernels = profile_f(args.export / "SliMM_B.onnx", feeds, args.threads, runs=3)
    print(
        f"{args.export}: part B on a {h}x{w} image ({feeds['pixel_values'].shape[0]} patches), "
        f"{args.threads} threads: {kernels / 1e3:.2f} s of kernels per call"
    )
    print_ops(ops, nodes, kernels, args.top)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_ort", description=__doc__.splitlines()[0])
    p.add_argument("export", type=Path, help="export directory (fp32, int8, int4 or w8a8)")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=12)
    p.add_argument(
        "--vision",
        metavar="HxW",
        default=None,
        help="profile the vision encoder (part B) on a synthetic image of this size instead",
    )
    args = p.parse_args(argv)

    import slimm

    backend = slimm.load(args.export, backend="onnx", device="cpu", threads=args.threads)
    if args.vision:
        return profile_vision(backend, args)
    parts, step_ms, feeds = per_part(backend, args.prompt_tokens, args.steps)
    print(
        f"{args.export} ({backend.manifest.precision}), {args.threads} threads, cache of "
        f"{args.prompt_tokens + args.steps + 2} slots: decode step {step_ms:.1f} ms"
    )
    print("\n| where | ms/step | share |\n| --- | ---: | ---: |")
    for k, v in sorted(parts.items(), key=lambda x: -x[1]):
        print(f"| {k if k.startswith('host') else 'part ' + k} | {v:.2f} | {100 * v / step_ms:.1f}% |")
    other = step_ms - sum(parts.values())
    print(f"| host: rest (feeds, checks, argmax) | {other:.2f} | {100 * other / step_ms:.1f}% |")

    ops, nodes, kernels = profile_f(args.export / "SliMM_F.onnx", feeds, args.threads)
    nodes_per_run = sum(c for _, _, c in ops)
    print(
        f"\nInside F (ONNX Runtime profiler): {kernels:.1f} ms of kernels per call, {nodes_per_run} kernels"
    )
    print_ops(ops, nodes, kernels, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
