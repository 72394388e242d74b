"""Accuracy of the trained demo model on every backend and precision: held-out questions of its
synthetic task answered greedily and scored by `slimm eval`, each row set against torch fp32 (points
of accuracy, and the share of answers identical to torch's).

    python -m benchmarks.accuracy [--n 500] [--seed 0] [--rows torch:fp32,onnx:int4,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# (backend, precision): fp32 everywhere, then the ONNX Runtime-only precisions
ROWS = (
    ("torch", "fp32"),
    ("onnx", "fp32"),
    ("jax", "fp32"),
    ("paddle", "fp32"),
    ("mindspore", "fp32"),
    ("onnx", "fp16"),
    ("onnx", "int8"),
    ("onnx", "int4"),
    ("onnx", "w8a8"),
    ("onnx", "int4+w8a8"),
    ("onnx", "int8+w8a8"),
)


def measure(
    rows=ROWS, n: int = 500, seed: int = 0, progress: bool = True, reference: dict | None = None
) -> list[dict[str, Any]]:
    """One eval report per (backend, precision), each with `delta_points` and `identical` against
    the torch fp32 report (`reference`, else the first row, which must then be torch fp32)."""
    from slimm.cache import demo_dir_for
    from slimm.evaluation import compare, run_eval

    out = []
    for backend, precision in rows:
        path = demo_dir_for(backend, precision)
        t = time.monotonic()
        report = run_eval(synthetic_n=n, seed=seed, model=path, backend=backend, progress=progress)
        report.update(precision=precision, wall_seconds=round(time.monotonic() - t, 1))
        if reference is None:
            if (backend, precision) != ("torch", "fp32"):
                raise ValueError("the first row is the reference: torch fp32")
            reference = report
        report.update(compare(report, reference))
        out.append(report)
    return out


def table(reports: list[dict[str, Any]]) -> str:
    types = list(reports[0]["by_type"])
    head = (
        "| backend | precision | accuracy | vs torch fp32 | identical answers | " + " | ".join(types) + " |"
    )
    lines = [head, "|" + " --- |" * (5 + len(types))]
    for r in reports:
        per = " | ".join(f"{r['by_type'][t]['accuracy']:.3f}" for t in types)
        lines.append(
            f"| {r['backend']} | {r['precision']} | {r['accuracy']:.3f} | {r['delta_points']:+.1f} pt | "
            f"{100 * r['identical']:.1f}% | {per} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=500, help="held-out questions per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rows",
        default=",".join(f"{b}:{q}" for b, q in ROWS),
        help="comma-separated backend:precision rows; the first must be torch:fp32",
    )
    p.add_argument("--out", type=Path, help="folder for results.json and table.md")
    a = p.parse_args(argv)
    rows = []
    for item in a.rows.split(","):
        backend, _, precision = item.partition(":")
        if (backend, precision or "fp32") not in ROWS:
            p.error(f"--rows: {item!r} is not one of {', '.join(f'{b}:{q}' for b, q in ROWS)}")
        rows.append((backend, precision or "fp32"))
    reports = measure(rows, a.n, a.seed)
    text = table(reports)
    print(text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        slim = [{k: v for k, v in r.items() if k not in ("rows", "errors")} for r in reports]
        (a.out / "results.json").write_text(json.dumps(slim, indent=1))
        (a.out / "table.md").write_text(text + "\n")
        print(f"wrote {a.out / 'results.json'} and table.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
