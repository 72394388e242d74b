"""Question-answering accuracy of a loaded model on JSONL rows {image(s) or video, question, answer}:
normalised exact match, per question type, a progress bar and a JSON report. A bad row is reported
in the report and skipped; the run goes on. `run_eval` is what `slimm eval` calls.
"""

from __future__ import annotations

import json
import os
import re
import string
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from slimm.errors import InputError, SliMMError

NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
)
ARTICLES = ("a", "an", "the")
NORMALISATION = (
    "lowercase; punctuation replaced by spaces; the articles a/an/the dropped; number words "
    "zero..twenty written as digits; whitespace collapsed (VQA / SQuAD style)"
)
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_WORD_TO_DIGIT = {w: str(i) for i, w in enumerate(NUMBER_WORDS)}


def normalise(text: str) -> str:
    """The form answers are compared in: see NORMALISATION ("Two." == "2", "The circle" == "circle")."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(_WORD_TO_DIGIT.get(w, w) for w in words if w not in ARTICLES)


def is_match(prediction: str, answer: str | list[str]) -> bool:
    """Normalised exact match against the answer, or any of a list of accepted answers."""
    answers = answer if isinstance(answer, list) else [answer]
    return any(normalise(prediction) == normalise(a) for a in answers)


# ---- rows --------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file; a line that is not a JSON object becomes {"_error": why} so that it
    is reported with the others and the run goes on. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: eval data file not found")
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append({"_error": f"line {line_no}: not valid JSON ({e.msg})", "_line": line_no})
                continue
            if not isinstance(row, dict):
                rows.append({"_error": f"line {line_no}: expected a JSON object", "_line": line_no})
                continue
            rows.append({**row, "_line": line_no})
    if not rows:
        raise InputError(f"{path}: no rows (expected one JSON object per line)")
    return rows


def _paths(value: Any, field: str, base: Path | None) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v for v in items):
        raise InputError(f"'{field}' must be a path or a list of paths, got {value!r}")
    out = []
    for v in items:
        p = Path(v).expanduser()
        if base is not None and not p.is_absolute() and "://" not in v and not v.startswith("data:"):
            p = base / p  # relative paths are relative to the JSONL file
        out.append(str(p))
    return out


def _load_media(row: dict[str, Any], base: Path | None) -> tuple[list[Any], list[Any]]:
    """The row's images (PIL) and videos (frame lists), opened now so that a bad file fails here."""
    from slimm.processing import list_frames, load_image

    images, videos = [], []
    if "image" in row or "images" in row:
        field = "image" if "image" in row else "images"
        images = [load_image(p, f"image {p}") for p in _paths(row[field], field, base)]
    if "video" in row:
        video = row["video"]
        if isinstance(video, str):  # a folder of frames
            folder = Path(_paths(video, "video", base)[0])
            if not folder.is_dir():
                raise InputError(f"video {folder}: not a folder of frames")
            frames = list_frames(folder)
        else:
            frames = _paths(video, "video", base)
        videos = [[load_image(p, f"video frame {p}") for p in frames]]
    return images, videos


def check_row(row: dict[str, Any]) -> None:
    if "_error" in row:
        raise InputError(row["_error"])
    for field in ("question", "answer"):
        if field not in row or row[field] is None:
            raise InputError(f"missing field '{field}'")
    if not isinstance(row["question"], str) or not row["question"].strip():
        raise InputError("'question' must be a non-empty string")
    ans = row["answer"]
    if not (isinstance(ans, str) and ans.strip()) and not (
        isinstance(ans, list) and ans and all(isinstance(a, str) and a.strip() for a in ans)
    ):
        raise InputError("'answer' must be a non-empty string or a list of them (the row has no answer)")


# ---- evaluation --------------------------------------------------------------------------------------


def _answer(model, question: str, images: list[Any], videos: list[Any], max_new_tokens: int) -> str:
    inputs = model.prepare(question, images=images, videos=videos)
    seqs = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = seqs[0, inputs["input_ids"].shape[1] :]
    return model.processor.decode(new, skip_special_tokens=True).strip()


def evaluate(
    model,
    rows: Iterable[dict[str, Any]],
    *,
    base_dir: str | Path | None = None,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Answer every row with greedy decoding on a loaded model (`slimm.load(...)`) and score it.

    Rows: {"question", "answer" (a string or a list of accepted ones), "image" (path or list) or
    "video" (frames folder or list of frame paths), optional "type" and "id"}; relative paths are
    resolved against `base_dir`. Returns the report (see `summarise`)."""
    from tqdm import tqdm

    if getattr(model, "processor", None) is None:
        raise InputError(
            "the model has no tokenizer files: eval needs them to build prompts and read answers"
        )
    rows = list(rows)
    base = Path(base_dir) if base_dir is not None else None
    results, errors = [], []
    start = time.monotonic()
    bar = tqdm(rows, desc="eval", unit="q", disable=not progress, dynamic_ncols=True)
    correct = 0
    for i, row in enumerate(bar):
        rid = row.get("id", i) if isinstance(row, dict) else i
        where = {"row": i, "id": rid, **({"line": row["_line"]} if "_line" in row else {})}
        try:
            check_row(row)
            images, videos = _load_media(row, base)
            prediction = _answer(model, row["question"], images, videos, max_new_tokens)
        except SliMMError as e:  # this row is unusable: say why, go on with the others
            errors.append({**where, "error": str(e)})
            bar.set_postfix(acc=f"{correct / max(1, len(results)):.3f}", errors=len(errors))
            continue
        ok = is_match(prediction, row["answer"])
        correct += ok
        results.append(
            {
                **where,
                "type": str(row.get("type", "all")),
                "question": row["question"],
                "answer": row["answer"],
                "prediction": prediction,
                "correct": ok,
            }
        )
        bar.set_postfix(acc=f"{correct / len(results):.3f}", errors=len(errors))
    bar.close()
    return summarise(results, errors, time.monotonic() - start)


def summarise(results: list[dict[str, Any]], errors: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """accuracy over the scored rows (bad rows are counted in `errors`, not scored), per type."""
    by_type: dict[str, dict[str, Any]] = {}
    for r in results:
        t = by_type.setdefault(r["type"], {"n": 0, "correct": 0})
        t["n"] += 1
        t["correct"] += int(r["correct"])
    for t in by_type.values():
        t["accuracy"] = t["correct"] / t["n"]
    n = len(results)
    correct = sum(int(r["correct"]) for r in results)
    return {
        "accuracy": correct / n if n else 0.0,
        "n": n,
        "correct": correct,
        "n_errors": len(errors),
        "by_type": dict(sorted(by_type.items())),
        "normalisation": NORMALISATION,
        "seconds": round(seconds, 1),
        "errors": errors,
        "rows": results,
    }


def compare(report: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    """`report` against `reference` over the rows both scored (matched by id): its accuracy minus the
    reference's in points, and the share of answers identical to the reference's."""
    ref = {r["id"]: r for r in reference["rows"]}
    both = [r for r in report["rows"] if r["id"] in ref]
    if not both:
        raise InputError("the two reports share no scored rows (ids)")
    same = sum(r["prediction"] == ref[r["id"]]["prediction"] for r in both)
    delta = sum(int(r["correct"]) - int(ref[r["id"]]["correct"]) for r in both)
    return {"n": len(both), "delta_points": round(100 * delta / len(both), 2), "identical": same / len(both)}


def format_report(report: dict[str, Any]) -> str:
    """The lines `slimm eval` prints."""
    lines = [f"accuracy {report['accuracy']:.4f} ({report['correct']}/{report['n']})"]
    lines += [
        f"  {t:12s} {r['accuracy']:.4f} ({r['correct']}/{r['n']})" for t, r in report["by_type"].items()
    ]
    if report["n_errors"]:
        lines.append(f"{report['n_errors']} row(s) could not be evaluated:")
        lines += [f"  row {e['row']} (id {e['id']}): {e['error']}" for e in report["errors"][:20]]
        if report["n_errors"] > 20:
            lines.append(f"  ... and {report['n_errors'] - 20} more (see the JSON report)")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write the JSON report whole (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def run_eval(
    data_path: str | Path | None = None,
    synthetic_n: int | None = None,
    seed: int = 0,
    model: str | Path | None = None,
    backend: str = "torch",
    out_json: str | Path | None = None,
    *,
    progress: bool = True,
    max_new_tokens: int = 32,
    **load_kwargs: Any,
) -> dict[str, Any]:
    """`slimm eval`: rows from `data_path` (JSONL) or `synthetic_n` held-out questions of the demo
    task (slimm.synthetic, seed `seed`); `model` a checkpoint or export directory (default: the
    trained demo model) loaded with `backend` (extra keywords go to slimm.load)."""
    import slimm

    if (data_path is None) == (synthetic_n is None):
        raise InputError("give either an eval data file or a number of synthetic questions, not both")
    if model is None:
        from slimm.cache import demo_dir_for

        model = demo_dir_for(backend)
    loaded = slimm.load(model, backend=backend, **load_kwargs)
    with tempfile.TemporaryDirectory(prefix="slimm-eval-") as tmp:
        if synthetic_n is not None:
            if synthetic_n <= 0:
                raise InputError(f"--synthetic needs a positive number of questions, got {synthetic_n}")
            from slimm.synthetic import write_heldout

            data_path = write_heldout(Path(tmp) / "heldout", synthetic_n, seed)
        rows = read_jsonl(data_path)
        report = evaluate(
            loaded, rows, base_dir=Path(data_path).parent, max_new_tokens=max_new_tokens, progress=progress
        )
    report.update(
        model=str(model),
        backend=backend,
        data=f"synthetic:{synthetic_n}:seed{seed}" if synthetic_n is not None else str(data_path),
    )
    if out_json is not None:
        write_report(report, out_json)
    return report


def evaluate_synthetic(
    model: str | Path, n: int, seed: int = 0, backend: str = "torch", progress: bool = True
) -> dict[str, Any]:
    """Accuracy on `n` held-out questions of the demo task."""
    return run_eval(synthetic_n=n, seed=seed, model=model, backend=backend, progress=progress)
