"""`slimm batch` on Ray Data: read INPUT's rows (inputs), prepare and answer them in a worker pool
(pipeline), write OUT once per id (output), joining or starting Ray (cluster); job ties them together.

`answer_dataset(ds, ...)` is the entry for Ray users' own pipelines; `run_batch(...)` is the command.
"""

__all__ = ["answer_dataset", "run_batch", "Summary"]


def __getattr__(name: str):
    # imported on first use: pyarrow comes with the ray extra, and cluster.py must be importable
    # without it to say which extra to install
    if name == "answer_dataset":
        from slimm.batch.pipeline import answer_dataset

        return answer_dataset
    if name in ("run_batch", "Summary"):
        from slimm.batch import job

        return getattr(job, name)
    raise AttributeError(f"module 'slimm.batch' has no attribute {name!r}")
