"""docs/operators.md, generated from the converter registries (never written by hand)."""

from __future__ import annotations

import importlib.util

from slimm.convert import TARGETS, get_target


def operators_markdown() -> str:
    tables = {}
    for name in TARGETS:
        if importlib.util.find_spec(name) is None:  # a target is named after its framework module
            continue
        try:
            tables[name] = get_target(name).registry.table()
        except ImportError:
            continue
    ops = sorted(set().union(*[t.keys() for t in tables.values()])) if tables else []
    lines = [
        "# ONNX operators supported by `slimm convert`",
        "",
        "Generated from the converter registries by `slimm operators`; do not edit by hand.",
        "Each cell lists the opset versions from which a handler applies (a model of opset N uses",
        "the newest handler whose version is <= N). Every handler is tested against ONNX Runtime",
        "on one-node graphs (tests/convert/test_convert_ops.py).",
        "",
        "| op | " + " | ".join(tables) + " |",
        "| --- | " + " | ".join("---" for _ in tables) + " |",
    ]
    for op in ops:
        cells = [", ".join(str(v) for v in tables[t].get(op, [])) or "—" for t in tables]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
