"""Where `slimm batch` writes: answered rows land as they come in part files beside OUT (OUT.parts/,
each written whole and renamed into place), and OUT is made from them once every row is in, one row
per id. An interrupted run leaves its parts; --resume counts them, and OUT's rows, as done.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from slimm.batch.pipeline import ANSWER_SCHEMA
from slimm.errors import InputError

OUT_SCHEMA = pa.schema(
    [("id", pa.string()), ("source", pa.string()), ("prompt", pa.string()), *ANSWER_SCHEMA]
)
FORMATS = {".parquet": "parquet", ".pq": "parquet", "": "parquet", ".jsonl": "jsonl"}


class Output:
    """OUT and its parts folder. Refuses an existing OUT (or an interrupted run's parts) unless
    `resume`; `done` holds the ids already written, and `write` adds each new id once."""

    def __init__(self, path: Path, resume: bool = False) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in FORMATS:
            raise InputError(
                f"--output {self.path}: write .parquet (the default format) or .jsonl, not {suffix}"
            )
        self.format = FORMATS[suffix]
        self.parts = self.path.with_name(self.path.name + ".parts")
        if self.path.is_dir():
            raise InputError(f"--output {self.path} is a folder; name the {self.format} file to write")
        if not resume:
            if self.path.exists():
                raise InputError(
                    f"--output {self.path} exists; pass --resume to answer only the rows it lacks, or "
                    "choose another file (it is not overwritten)"
                )
            if self.parts.exists():
                raise InputError(
                    f"{self.parts} holds the rows of an interrupted run; pass --resume to finish it, or "
                    "remove that folder to start over"
                )
        if not self.path.parent.is_dir():
            raise InputError(f"--output {self.path}: its folder {self.path.parent} does not exist")
        self.done: set[str] = set()
        for table in self._tables(columns=["id"]):
            self.done.update(table.column("id").to_pylist())
        self.resumed = len(self.done)
        self._next = 1 + max((int(p.stem.split("-")[1]) for p in self._part_files()), default=-1)

    def write(self, table: pa.Table) -> pa.Table:
        """Rows not written before, in OUT's columns, into a new part file; returns them."""
        ids = table.column("id").to_pylist()
        keep, seen = [], set()
        for i, rid in enumerate(ids):
            if rid not in self.done and rid not in seen:  # a retried batch's rows come once
                keep.append(i)
                seen.add(rid)
        new = table.take(pa.array(keep, pa.int64())).select(OUT_SCHEMA.names).cast(OUT_SCHEMA)
        if new.num_rows:
            self.parts.mkdir(exist_ok=True)
            path = self.parts / f"part-{self._next:06d}.parquet"
            pq.write_table(new, str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)  # a part is whole or absent, even if the run is killed
            self._next += 1
            self.done.update(seen)
        return new

    def finish(self) -> int:
        """OUT from its previous rows and every part, one row per id; the parts folder removed."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        seen: set[str] = set()
        writer = pq.ParquetWriter(tmp, OUT_SCHEMA) if self.format == "parquet" else None
        try:
            with open(tmp, "w", encoding="utf-8") if writer is None else contextlib.nullcontext() as text:
                for table in self._tables():
                    ids = table.column("id").to_pylist()
                    keep = [i for i, rid in enumerate(ids) if rid not in seen]
                    seen.update(ids)
                    table = table.take(pa.array(keep, pa.int64()))
                    if writer is not None:
                        writer.write_table(table)
                    else:
                        for row in table.to_pylist():
                            text.write(json.dumps(row, ensure_ascii=False) + "\n")
        finally:
            if writer is not None:
                writer.close()
        os.replace(tmp, self.path)
        shutil.rmtree(self.parts, ignore_errors=True)
        return len(seen)

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet")) if self.parts.is_dir() else []

    def _tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """OUT's rows (if it exists), then each part's."""
        if self.path.exists():
            yield self._read_out(columns)
        for part in self._part_files():
            yield pq.read_table(part, columns=columns, schema=OUT_SCHEMA)

    def _read_out(self, columns: list[str] | None) -> pa.Table:
        schema = OUT_SCHEMA if columns is None else pa.schema([OUT_SCHEMA.field(c) for c in columns])
        try:
            if self.format == "parquet":
                return pq.read_table(self.path, columns=columns).cast(schema)
            with open(self.path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
            return pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)
        except (pa.ArrowInvalid, OSError, KeyError, ValueError) as e:
            raise InputError(f"--output {self.path}: cannot read its rows to resume ({e})") from None
