"""Rows/s of `slimm batch` with 1 and 2 workers against a plain Python loop over the same rows with the
same backend and batches (the read stage's and the model stage's own functions, called in order), so
the difference is what Ray costs. Wall time from the call to the last row written, model loading
included, the Ray runtime's own start-up not (reported apart). Writes results.json and table.md.

    nice -n 5 python -m benchmarks.batch [--rows 96] [--max-new-tokens 32] [--batch-size 8] --out DIR
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = [(56, 56), (84, 112), (140, 84), (224, 224), (56, 168), (112, 112), (100, 60), (200, 150)]


def make_images(folder: Path, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i:04d}.png")
    return folder


def plain_loop(images: Path, backend: str, max_new_tokens: int, batch_size: int, threads: int | None) -> dict:
    """The same rows through the same two functions in one process, one batch after another."""
    from slimm.batch.inputs import read_rows
    from slimm.batch.pipeline import DEFAULT_PROMPT, ModelWorker, prepare_batch

    t0 = time.perf_counter()
    rows = read_rows(images, DEFAULT_PROMPT)
    worker = ModelWorker(None, backend, max_new_tokens, load_kwargs=_threads(threads))
    answered = 0
    for i in range(0, rows.num_rows, batch_size):
        answered += worker(prepare_batch(rows.slice(i, batch_size), None, backend, DEFAULT_PROMPT)).num_rows
    return {"rows": answered, "wall_s": time.perf_counter() - t0}


def on_ray(
    images: Path,
    out: Path,
    backend: str,
    max_new_tokens: int,
    batch_size: int,
    workers: int,
    threads: int | None,
) -> dict:
    from slimm.batch import run_batch

    t0 = time.perf_counter()
    summary = run_batch(
        images,
        out,
        backend=backend,
        max_new_tokens=max_new_tokens,
        workers=workers,
        batch_size=batch_size,
        **_threads(threads),
    )
    wall = time.perf_counter() - t0
    assert summary.errors == 0
    return {"rows": summary.rows, "wall_s": wall}


def _threads(threads: int | None) -> dict:
    return {} if threads is None else {"threads": threads}


def table(results: dict) -> str:
    base = results["runs"]["loop"]
    lines = [
        f"{results['rows']} images ({len(SIZES)} sizes, 56x56 to 224x224), {results['max_new_tokens']} new tokens "
        f"each, batches of {results['batch_size']}, `{results['backend']}` demo model, "
        f"{results['cpus']} CPUs; Ray start-up ({results['ray_start_s']:.1f} s) not counted",
        "",
        "| run | wall s | rows/s | overhead vs the loop |",
        "|---|---:|---:|---:|",
    ]
    for name, r in results["runs"].items():
        rate = r["rows"] / r["wall_s"]
        over = "—" if name == "loop" else f"{r['wall_s'] / base['wall_s'] - 1:+.0%}"
        lines.append(f"| {name} | {r['wall_s']:.1f} | {rate:.2f} | {over} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=96)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--backend", default="onnx")
    p.add_argument("--threads", type=int, help="intra-op threads per model (default: the framework's)")
    p.add_argument("--out", type=Path, required=True, help="folder for results.json and table.md")
    args = p.parse_args(argv)

    import os

    import ray

    from slimm.batch.cluster import local_cpus
    from slimm.cache import demo_dir_for

    demo_dir_for(args.backend)  # built before anything is timed
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(Path(tmp), args.rows)
        runs = {"loop": plain_loop(images, args.backend, args.max_new_tokens, args.batch_size, args.threads)}
        t0 = time.perf_counter()
        ray.init(num_cpus=local_cpus(2), include_dashboard=False, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray_start = time.perf_counter() - t0
        for workers in (1, 2):
            out = Path(tmp) / f"out-{workers}.parquet"
            runs[f"ray, {workers} worker{'s' if workers > 1 else ''}"] = on_ray(
                images, out, args.backend, args.max_new_tokens, args.batch_size, workers, args.threads
            )
        ray.shutdown()
    results = {
        "rows": args.rows,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "backend": args.backend,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "ray": ray.__version__,
        "ray_start_s": ray_start,
        "runs": runs,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    (args.out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
