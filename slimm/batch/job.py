"""`slimm batch`: INPUT's rows through the Ray Data pipeline into OUT, each id exactly once.

Ray restarts a killed worker and reruns its batches; a rerun's rows are the same rows (greedy), and
OUT keeps the first row of each id. After a pass every input id is checked to be in OUT; what is not
(a batch whose worker died on every retry) is answered again one row per batch, and a row that still
kills its worker is written as an error row: nothing is lost and nothing is written twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from slimm.batch.inputs import read_rows
from slimm.batch.output import OUT_SCHEMA, Output
from slimm.batch.pipeline import DEFAULT_PROMPT, RETRIES, STOP_TOKENS, answer_dataset, model_path
from slimm.errors import InputError, SliMMError

PASSES = 3  # a row missing after this many passes over what is left is an error, not a silent loss


@dataclass
class Summary:
    rows: int = 0  # answered in this run (error rows included)
    errors: int = 0
    skipped: int = 0  # already in OUT (--resume)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # from the first row sent to the last row written
    output: Path | None = None

    def line(self) -> str:
        rate = self.rows / self.seconds if self.seconds else 0.0
        tokens = self.completion_tokens / self.seconds if self.seconds else 0.0
        skipped = f", {self.skipped} already in OUT" if self.skipped else ""
        return (
            f"{self.rows} rows ({self.errors} errors{skipped}) in {self.seconds:.1f} s: {rate:.2f} rows/s, "
            f"{tokens:.1f} tokens/s; wrote {self.output}"
        )


def blocks(table: pa.Table, batch_size: int, workers: int) -> list[pa.Table]:
    """Input blocks: a few per worker so that every worker has work and a killed one has little to
    redo, of whole model batches, at most 16 batches each."""
    per = batch_size * min(16, max(1, table.num_rows // (batch_size * workers * 8)))
    return [table.slice(i, per) for i in range(0, table.num_rows, per)]


def run_batch(
    input: Path,
    output: Path,
    model: str | None = None,
    backend: str = "torch",
    *,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 128,
    ray_address: str | None = None,
    workers: int = 1,
    batch_size: int = 8,
    resume: bool = False,
    stop_tokens: tuple[int, ...] = STOP_TOKENS,
    **load_kwargs,
) -> Summary:
    """Answer every row of `input` not yet in `output` on Ray (a local runtime unless `ray_address`)."""
    from slimm.batch.cluster import connect, import_ray, local_cpus
    from slimm.generate import check_generation_settings

    check_generation_settings(max_new_tokens)
    for name, value in (("--workers", workers), ("--batch-size", batch_size)):
        if not (isinstance(value, int) and value >= 1):
            raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    rows = read_rows(input, prompt)
    out = Output(output, resume)
    summary = Summary(output=out.path)
    todo = _without(rows, out.done)
    summary.skipped = rows.num_rows - todo.num_rows
    if todo.num_rows:
        import_ray()  # the install hint before a model is built
        # here, once, before any worker: a missing model is an error now, and the demo model is built
        # by one process rather than by every worker at the same time
        model_path(model, backend)
        started = not _ray_running()
        ray = connect(ray_address, num_cpus=local_cpus(workers))
        context = ray.data.DataContext.get_current()
        errored_blocks, context.max_errored_blocks = context.max_errored_blocks, -1
        try:
            t0 = time.perf_counter()
            for attempt in range(PASSES):
                # after the first pass, what is left goes one row per batch: a row that kills its worker
                # every time takes no other row with it
                size = batch_size if attempt == 0 else 1
                ds = ray.data.from_arrow(blocks(todo, size, workers))
                answered = answer_dataset(
                    ds,
                    model,
                    backend,
                    prompt=prompt,
                    max_new_tokens=max_new_tokens,
                    workers=workers,
                    batch_size=size,
                    stop_tokens=stop_tokens,
                    **load_kwargs,
                )
                try:
                    for table in answered.iter_batches(batch_format="pyarrow", batch_size=None):
                        _count(summary, out.write(table))
                except ray.exceptions.RayError as e:
                    raise SliMMError(
                        f"the Ray job failed ({_first_line(e)}); the rows answered so far are kept in "
                        f"{out.parts}: fix the cause and run again with --resume"
                    ) from None
                todo = _without(todo, out.done)
                if not todo.num_rows:
                    break
            if todo.num_rows:
                _count(summary, out.write(_lost(todo)))
            summary.seconds = time.perf_counter() - t0
        finally:
            context.max_errored_blocks = errored_blocks
            if started:
                ray.shutdown()
    out.finish()
    return summary


def _without(rows: pa.Table, done: set[str]) -> pa.Table:
    return rows.filter(pc.invert(pc.is_in(rows.column("id"), pa.array(list(done), pa.string()))))


def _lost(rows: pa.Table) -> pa.Table:
    """Rows whose worker died every time it answered them, alone: error rows, not silent gaps."""
    n = rows.num_rows
    why = (
        f"the worker process died each of the {RETRIES + 1} times it answered this row alone (out of "
        "memory, or a crash inside the framework)"
    )
    lost = {name: rows.column(name) for name in ("id", "source", "prompt")}
    lost.update(answer=[None] * n, prompt_tokens=[None] * n, completion_tokens=[None] * n)
    return pa.table({**lost, "seconds": [0.0] * n, "error": [why] * n}, schema=OUT_SCHEMA)


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(e).__name__


def _ray_running() -> bool:
    from slimm.batch.cluster import import_ray

    return import_ray().is_initialized()


def _count(summary: Summary, table: pa.Table) -> None:
    summary.rows += table.num_rows
    summary.errors += table.num_rows - table.column("error").null_count
    summary.prompt_tokens += pc.sum(table.column("prompt_tokens")).as_py() or 0
    summary.completion_tokens += pc.sum(table.column("completion_tokens")).as_py() or 0
