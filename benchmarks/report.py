"""Benchmark results as a Markdown table (with the project's goals checked, and each slimm row against
the fastest peer engine at its precision) and a PNG chart."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from benchmarks.measure import ONNX_EXPORTS
from slimm.export.quantize import BLOCK_SIZE, BLOCKED

# (what, backend, precision, metric, peer backend(s), peer precision, bound, direction): the project's
# targets, each a ratio of two measured rows (a tuple of peers: the best of them); direction ">="
# (faster) or "<=" (less time)
# (left as written: one goal a line reads as a table)
# fmt: off
GOALS = (
    ("ONNX Runtime fp32 decode vs transformers", "onnx", "fp32", "decode", "transformers", "fp32", 2.2, ">="),
    ("ONNX Runtime int8 decode vs transformers", "onnx", "int8", "decode", "transformers", "fp32", 6.0, ">="),
    ("ONNX Runtime int4 decode vs transformers", "onnx", "int4", "decode", "transformers", "fp32", 10.0, ">="),
    ("ONNX Runtime vision encode time vs transformers", "onnx", "fp32", "vision", "transformers", "fp32", 0.8, "<="),
    ("ONNX Runtime prefill tok/s vs transformers", "onnx", "fp32", "prefill", "transformers", "fp32", 1.5, ">="),
    # w8a8 (int8 GEMMs, the vision tower included) is the precision for the compute-bound phases
    ("ONNX Runtime w8a8 vision encode time vs transformers", "onnx", "w8a8", "vision", "transformers", "fp32", 0.8,
     "<="),
    ("ONNX Runtime w8a8 prefill tok/s vs transformers", "onnx", "w8a8", "prefill", "transformers", "fp32", 1.5, ">="),
    ("ONNX Runtime w8a8 decode vs transformers", "onnx", "w8a8", "decode", "transformers", "fp32", 6.0, ">="),
    ("JAX decode vs ONNX Runtime fp32", "jax", "fp32", "decode", "onnx", "fp32", 0.8, ">="),
    ("Paddle decode vs ONNX Runtime fp32", "paddle", "fp32", "decode", "onnx", "fp32", 0.5, ">="),
    ("MindSpore decode vs ONNX Runtime fp32", "mindspore", "fp32", "decode", "onnx", "fp32", 0.5, ">="),
    # issue 13: the engines users would pick instead, in the same run (`--peers`)
    ("int4 decode vs the faster of onnxruntime-genai int4 and llama.cpp q4_0", "onnx", "int4", "decode",
     ("onnxruntime-genai", "llama.cpp"), "int4", 1.0, ">="),
    ("int4 decode vs the faster int4 peer (stretch)", "onnx", "int4", "decode", ("onnxruntime-genai", "llama.cpp"),
     "int4", 1.2, ">="),
    ("int8 decode vs llama.cpp q8_0", "onnx", "int8", "decode", ("llama.cpp",), "int8", 1.0, ">="),
    ("fp32 decode vs onnxruntime-genai fp32", "onnx", "fp32", "decode", ("onnxruntime-genai",), "fp32", 1.0, ">="),
    ("int4 prefill vs onnxruntime-genai int4", "onnx", "int4", "prefill", ("onnxruntime-genai",), "int4", 1.3, ">="),
)
# slimm precision -> the peers' precision it is compared with (w8a8 stores int8 weights; a mixed
# export decodes with its weight-only half)
PEER_PRECISION = {
    "fp32": "fp32",
    "int8": "int8",
    "int4": "int4",
    "w8a8": "int8",
    "int4+w8a8": "int4",
    "int8+w8a8": "int8",
}
# fmt: on
MEMORY_BOUND = 1.5  # peak resident memory <= 1.5 x the bytes of weights the backend runs
# The memory goal is about loading the weights without copies; below this many weight bytes the
# frameworks' own resident memory (their libraries: 0.2-0.6 GB) dominates the ratio (6.48x for the tiny
# demo model's few MB), which then measures the framework, not the loading. 0.5b fp32 is 2 GB.
MEMORY_GOAL_MIN_WEIGHTS = 500e6


def _value(row: dict, metric: str) -> float | None:
    if metric not in row:
        return None
    if metric == "vision":
        return row["vision"]["median_s"]
    return row[metric]["tokens_per_s"]


def _measured(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict]:
    """Rows that measured something (complete, or killed after some phases)."""
    return {(r["backend"], r["precision"]): r for r in results if "load_s" in r}


def _label(row: dict) -> str:
    return f"{row['backend']} {row.get('format', row['precision'])}"


def fastest_peer(results: list[dict[str, Any]], precision: str, metric: str, among=None) -> dict | None:
    """The peer row with the most tokens/s in `metric` at the peers' counterpart of `precision`."""
    want = PEER_PRECISION.get(precision)
    rows = [
        r
        for r in results
        if r.get("peer")
        and r["precision"] == want
        and _value(r, metric) is not None
        and (among is None or r["backend"] in among)
    ]
    return max(rows, key=lambda r: _value(r, metric), default=None)


def peer_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each measured slimm row's decode and prefill against the fastest peer at its precision (a
    metric with no peer measured is left out of the row; no rows at all in a run without peers)."""
    if not any(r.get("peer") for r in results):
        return []
    out = []
    for r in results:
        if r.get("peer") or "load_s" not in r or r["precision"] not in PEER_PRECISION:
            continue
        line: dict[str, Any] = {"backend": r["backend"], "precision": r["precision"]}
        for metric in ("decode", "prefill"):
            peer = fastest_peer(results, r["precision"], metric)
            if _value(r, metric) is None or peer is None:
                continue
            line[metric] = {
                "tokens_per_s": _value(r, metric),
                "peer": _label(peer),
                "peer_tokens_per_s": _value(peer, metric),
                "ratio": _value(r, metric) / _value(peer, metric),
            }
        out.append(line)
    return out


def compare(results: list[dict[str, Any]]) -> None:
    """Add to each measured row: greedy tokens agreeing with torch at the same precision (leading
    run), and peak memory as a multiple of weight bytes."""
    ok = _measured(results)
    for r in ok.values():
        ref = ok.get(("torch", r["precision"])) or ok.get(("torch", "fp32"))
        if ref is not None and r is not ref and "tokens" in r and "tokens" in ref:
            same = 0
            for a, b in zip(r["tokens"], ref["tokens"], strict=False):
                if a != b:
                    break
                same += 1
            r["tokens_agree_with_torch"] = same
        if r.get("weight_bytes"):
            r["peak_over_weights"] = r["peak_rss_bytes"] / r["weight_bytes"]


def goals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ok = _measured(results)
    out = []
    for what, b, p, metric, peer_b, peer_p, bound, direction in GOALS:
        row = ok.get((b, p))
        if isinstance(peer_b, tuple):  # the best of these peers that were measured
            peer = fastest_peer(results, peer_p, metric, among=peer_b)
            if b == "onnx":  # against the engines users would pick instead: slimm's fastest ONNX export
                rows = [ok.get((x, p)) for x in ("onnx", *ONNX_EXPORTS)]
                rows = [x for x in rows if x is not None and _value(x, metric) is not None]
                row = max(rows, key=lambda x: _value(x, metric), default=None)
        else:
            peer = ok.get((peer_b, peer_p))
        if row is None or peer is None or _value(row, metric) is None or _value(peer, metric) is None:
            continue
        ratio = _value(row, metric) / _value(peer, metric)
        met = ratio >= bound if direction == ">=" else ratio <= bound
        goal = {"goal": what, "target": f"{direction} {bound}x", "ratio": ratio, "met": met}
        if isinstance(peer_b, tuple):
            goal["against"] = _label(peer)
            goal["row"] = _label(row)
        out.append(goal)
    for r in results:
        if (
            not r.get("peer")  # the goal is slimm's: the peers' memory is theirs
            and r.get("peak_over_weights") is not None
            and r.get("status") == "ok"
            and r.get("weight_bytes", 0) >= MEMORY_GOAL_MIN_WEIGHTS
        ):
            x = r["peak_over_weights"]
            out.append(
                {
                    "goal": f"{r['backend']} {r['precision']} peak memory vs weight bytes",
                    "target": f"<= {MEMORY_BOUND}x",
                    "ratio": x,
                    "met": x <= MEMORY_BOUND,
                }
            )
    return out


def _gb(n: float | None) -> str:
    return "" if n is None else f"{n / 1e9:.2f}"


def markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    bw = meta.get("read_bandwidth_bytes_per_s")
    accuracy = any("demo_accuracy" in r for r in results)
    lines = [
        f"SliMM {meta['variant']} {meta['size']} (random weights); image {meta['image_size'][0]}x{meta['image_size'][1]}, "
        f"text prompt {meta['prompt_tokens']} tokens, {meta['decode_steps']} greedy decode steps, "
        f"median of {meta['repeats']} after a warm-up"
        + (f", best of {meta['rounds']} rounds" if meta.get("rounds", 1) > 1 else "")
        + (
            f"; int8 / int4 weights in blocks of {meta.get('block_size', 32)}"
            if any(r["precision"] in BLOCKED and "load_s" in r for r in results)
            else ""
        ),
        f"Machine: {meta['machine']}",
        f"Read bandwidth before the measurements: {bw / 1e9:.1f} GB/s (each row's roofline uses its own, "
        "measured right after its decode steps)"
        if bw
        else "Read bandwidth: not measured",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "",
        "| backend | precision | weights GB | peak RSS GB (x weights) | load s | compile s | vision encode s "
        "| prefill tok/s | TTFT s | decode tok/s | roofline tok/s @ bandwidth (% reached) | tokens = torch "
        "| logits error vs fp32 |" + (" demo-model accuracy (vs torch fp32) |" if accuracy else ""),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        + (" ---: |" if accuracy else ""),
    ]
    pad = " |" * (12 if accuracy else 11)
    notes = []
    # skipped rows with one reason at one precision share a line (int8 / int4 for every backend
    # but ONNX Runtime), in the place of the first of them
    skipped: dict[tuple, list[str]] = {}
    for r in results:
        if r.get("status") == "skipped":
            skipped.setdefault((r["precision"], r.get("reason", "")), []).append(r["backend"])
    for r in results:
        fmt = r.get("format")
        precision = f"{r['precision']} ({fmt})" if fmt and fmt != r["precision"] else r["precision"]
        head = f"| {r['backend']} | {precision} |"
        if r.get("status") == "skipped":
            names = skipped.pop((r["precision"], r.get("reason", "")), None)
            if names:
                lines.append(
                    f"| {', '.join(names)} | {r['precision']} | skipped: {r.get('reason', '')} |" + pad
                )
            continue
        if "load_s" not in r:
            lines.append(f"{head} {r.get('status', 'failed')}: {r.get('reason', '')} |" + pad)
            continue
        if r.get("status") != "ok":
            notes.append(
                f"- {r['backend']} {r['precision']}: {r.get('status')}: {r.get('reason', '')}; "
                "blank cells were not measured; peak memory is as of its last finished phase"
            )
        cells = [
            _gb(r["weight_bytes"]),
            f"{_gb(r['peak_rss_bytes'])} ({r['peak_rss_bytes'] / r['weight_bytes']:.2f}x)",
            f"{r['load_s']:.1f}",
            f"{r['compile_s']:.1f}" if "compile_s" in r else "",
        ]
        cells.append(f"{r['vision']['median_s']:.3f}" if "vision" in r else "")
        cells.append(f"{r['prefill']['tokens_per_s']:.1f}" if "prefill" in r else "")
        cells.append(f"{r['ttft']['median_s']:.3f}" if "ttft" in r else "")
        roof_txt = ""
        if "decode" in r:
            cells.append(f"{r['decode']['tokens_per_s']:.2f}")
            roof, bw = r.get("roofline_tokens_per_s"), r["decode"].get("read_bandwidth_bytes_per_s")
            at = f" @ {bw / 1e9:.0f} GB/s" if bw else ""
            roof_txt = f"{roof:.1f}{at} ({100 * r['roofline_fraction']:.0f}%)" if roof else ""
        else:
            cells.append("")
        cells.append(roof_txt)
        agree = r.get("tokens_agree_with_torch")
        cells.append("" if agree is None else f"{agree}/{len(r['tokens'])}")
        err = r.get("logits_error")
        is_reference = r.get("logits_reference") == f"{r['backend']} {r['precision']}"
        cells.append("" if err is None or is_reference else f"{err:.1e}")
        if accuracy:
            a = r.get("demo_accuracy")
            cells.append("" if a is None else f"{100 * a['accuracy']:.1f}% ({a['delta_points']:+.1f} pt)")
        lines.append(f"{head} " + " | ".join(cells) + " |")
    if accuracy:
        notes.append(
            f"- demo-model accuracy: the trained demo model (not this table's random weights) on "
            f"{meta.get('accuracy_questions')} held-out questions of its task, greedy, at the row's backend "
            f"and precision (int8 / int4 in blocks of {BLOCK_SIZE}), in points against torch fp32 (benchmarks/accuracy.py)"
        )
    if any(r.get("peer") for r in results):
        notes.append(
            "- peer rows (onnxruntime-genai, llama.cpp): the language model alone on the text prompt (no "
            "vision columns, no roofline); weights GB are their model files; greedy decode as slimm's rows"
        )
    if notes:
        lines += ["", *notes]
    ratios = peer_ratios(results)
    if ratios:
        lines += [
            "",
            "| backend | precision | decode tok/s | fastest peer (decode) | x peer | prefill tok/s "
            "| fastest peer (prefill) | x peer |",
            "| --- | --- | ---: | --- | ---: | ---: | --- | ---: |",
        ]
        for x in ratios:
            cells = []
            for metric in ("decode", "prefill"):
                m = x.get(metric)
                if m is None:
                    cells += ["", "no peer measured", ""]
                else:
                    cells += [f"{m['tokens_per_s']:.2f}", f"{m['peer']} {m['peer_tokens_per_s']:.2f}"]
                    cells.append(f"{m['ratio']:.2f}x")
            lines.append(f"| {x['backend']} | {x['precision']} | " + " | ".join(cells) + " |")
    checked = goals(results)
    if checked:
        lines += ["", "| goal | target | measured | met |", "| --- | --- | ---: | --- |"]
        for g in checked:
            against = f" ({g['row']} vs {g['against']})" if g.get("against") else ""
            lines.append(
                f"| {g['goal']} | {g['target']} | {g['ratio']:.2f}x{against} | {'yes' if g['met'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def chart(meta: dict[str, Any], results: list[dict[str, Any]], path: Path) -> str:
    """Four panels (decode with its roofline, prefill, vision encode, memory); a note on what was
    written. matplotlib is optional (the `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install 'slimm[bench]')"
    # decode and prefill: slimm's rows and the peers' (text only); vision and memory: slimm's rows
    llm = [r for r in results if "decode" in r and "prefill" in r]
    rows = [r for r in llm if "vision" in r]
    if not llm:
        return "chart skipped: no backend was measured"

    def ticks(ax, chosen: list[dict]) -> None:
        ax.set_xticks(list(range(len(chosen))))
        ax.set_xticklabels([f"{r['backend']}\n{r.get('format', r['precision'])}" for r in chosen], fontsize=7)

    fig, axes = plt.subplots(2, 2, figsize=(max(8, 1.2 * len(llm) + 4), 8))
    colors = ["tab:gray" if r.get("peer") else "tab:blue" for r in llm]
    ax = axes[0][0]
    ax.bar(range(len(llm)), [r["decode"]["tokens_per_s"] for r in llm], color=colors)
    roof = [r.get("roofline_tokens_per_s") for r in llm]
    if any(roof):
        ax.scatter(
            range(len(llm)),
            [v or float("nan") for v in roof],  # no mark for the peers
            marker="_",
            s=900,
            color="tab:red",
            label="bandwidth roofline",
        )
        ax.legend(loc="best", fontsize=8)
    ax.set_title("decode tokens/s (median step; grey: peers)")
    ticks(ax, llm)
    ax = axes[0][1]
    colors = ["tab:gray" if r.get("peer") else "tab:green" for r in llm]
    ax.bar(range(len(llm)), [r["prefill"]["tokens_per_s"] for r in llm], color=colors)
    ax.set_title(f"prefill tokens/s ({meta['prompt_tokens']}-token prompt; grey: peers)")
    ticks(ax, llm)
    x = range(len(rows))
    ax = axes[1][0]
    ax.bar(x, [r["vision"]["median_s"] for r in rows], color="tab:orange")
    ax.set_title(f"vision encode s ({meta['image_size'][0]}x{meta['image_size'][1]} image)")
    ticks(ax, rows)
    ax = axes[1][1]
    w = 0.4
    ax.bar(
        [i - w / 2 for i in x], [r["weight_bytes"] / 1e9 for r in rows], w, label="weights", color="tab:gray"
    )
    ax.bar(
        [i + w / 2 for i in x],
        [r["peak_rss_bytes"] / 1e9 for r in rows],
        w,
        label="peak RSS",
        color="tab:purple",
    )
    ax.legend(fontsize=8)
    ax.set_title("memory GB")
    ticks(ax, rows)
    fig.suptitle(f"SliMM {meta['variant']} {meta['size']} (random weights) - {meta['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart written to {path}"


def render(results_json: Path, out_dir: Path | None = None) -> str:
    """table.md and chart.png again from a results.json (after a change to the report itself, or to
    put a run's results beside the README); returns the table."""
    import json

    doc = json.loads(Path(results_json).read_text())
    out_dir = Path(out_dir or Path(results_json).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    compare(doc["results"])
    text = markdown(doc["meta"], doc["results"])
    (out_dir / "table.md").write_text(text)
    print(chart(doc["meta"], doc["results"], out_dir / "chart.png"), file=sys.stderr)
    return text


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=render.__doc__.splitlines()[0]
    )
    p.add_argument("results", type=Path, help="results.json written by `slimm bench`")
    p.add_argument(
        "--out", type=Path, default=None, help="directory for table.md and chart.png (default: beside it)"
    )
    args = p.parse_args(argv)
    if not args.results.is_file():
        print(f"error: {args.results}: no such file", file=sys.stderr)
        return 2
    sys.stdout.write(render(args.results, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
