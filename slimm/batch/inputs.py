"""The rows of a `slimm batch` INPUT: a folder of images (recursive) or a JSONL / CSV / Parquet table,
as one Arrow table of id, source, prompt and image / images / video paths (relative paths resolved
against the table's folder). Whole-input problems are errors here; a bad row is found later, per row.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from slimm.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".pq")
MEDIA_COLUMNS = ("image", "images", "video")  # a row is answered about whichever of these it has

ROWS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),  # the image, images (a JSON list) or video as the input names them
        ("prompt", pa.string()),
        ("image", pa.string()),
        ("images", pa.list_(pa.string())),
        ("video", pa.string()),
    ]
)


def read_rows(path: Path, prompt: str) -> pa.Table:
    """INPUT -> the rows to answer (ROWS_SCHEMA); `prompt` where a row has none of its own."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"INPUT {path} does not exist")
    if path.is_dir():
        return _folder_rows(path, prompt)
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise InputError(
            f"INPUT {path}: expected a folder of images or a {', '.join(TABLE_SUFFIXES)} table, "
            f"not a {path.suffix or 'suffix-less'} file"
        )
    records = _table_records(path)
    if not records:
        raise InputError(f"INPUT {path} holds no rows")
    columns = set().union(*(r.keys() for r in records))
    if not columns & set(MEDIA_COLUMNS):
        raise InputError(
            f"INPUT {path} has no image, images or video column (its columns: {', '.join(sorted(columns))})"
        )
    base = path.parent
    rows = {name: [] for name in ROWS_SCHEMA.names}
    for i, r in enumerate(records):
        rid = r.get("id")
        if "id" in columns and (rid is None or str(rid) == ""):
            raise InputError(f"INPUT {path}: row {i} has an empty id (every row of an id column needs one)")
        rows["id"].append(str(i) if rid is None else str(rid))
        rows["prompt"].append(r.get("prompt") or prompt)
        image, images, video = r.get("image"), _path_list(r.get("images"), path, i), r.get("video")
        rows["image"].append(_resolve(image, base))
        rows["images"].append(None if images is None else [_resolve(p, base) for p in images])
        rows["video"].append(_resolve(video, base))
        rows["source"].append(image or (json.dumps(images) if images is not None else video))
    _check_unique(rows["id"], path)
    return pa.table(rows, schema=ROWS_SCHEMA)


def _folder_rows(folder: Path, prompt: str) -> pa.Table:
    files = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise InputError(f"INPUT {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or its subfolders")
    ids = [p.relative_to(folder).as_posix() for p in files]
    n = len(files)
    return pa.table(
        {
            "id": ids,
            "source": [str(p) for p in files],
            "prompt": [prompt] * n,
            "image": [str(p.resolve()) for p in files],
            "images": [None] * n,
            "video": [None] * n,
        },
        schema=ROWS_SCHEMA,
    )


def _table_records(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        records = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"INPUT {path}, line {n}: not JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise InputError(
                        f"INPUT {path}, line {n}: expected a JSON object, got {type(record).__name__}"
                    )
                records.append(record)
        return records
    try:
        if suffix == ".csv":
            import pyarrow.csv as pacsv

            # every column as text: ids stay as written ("007" is not 7)
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
            table = table.cast(pa.schema([(name, pa.string()) for name in table.column_names]))
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"INPUT {path}: cannot read it as {suffix[1:].upper()} ({e})") from None
    return table.to_pylist()


def _path_list(value, path: Path, i: int) -> list[str] | None:
    """An `images` cell: a list of paths (JSONL, Parquet) or a JSON array in a string (CSV)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"INPUT {path}: row {i}: images must be a list of paths (in CSV: a JSON array)")
    return value


def _resolve(value: str | None, base: Path) -> str | None:
    if value is None or "://" in value or value.startswith("data:"):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _check_unique(ids: list[str], path: Path) -> None:
    seen: set[str] = set()
    twice = []
    for rid in ids:
        if rid in seen:
            twice.append(rid)
        seen.add(rid)
    if twice:
        shown = ", ".join(repr(t) for t in twice[:5])
        raise InputError(
            f"INPUT {path}: ids must be unique (each answer is written once per id); repeated: {shown}"
            + (f" and {len(twice) - 5} more" if len(twice) > 5 else "")
        )
