"""The Ray Data stages of `slimm batch`: a read stage that opens and preprocesses each row (no model),
and a pool of model workers (a callable class: the model loads once per actor) that answer batches
of prepared rows through the backend's batched greedy `generate`. `answer_dataset` chains the two.
"""

from __future__ import annotations

import functools
import io
import time
import warnings
from typing import Any

import numpy as np
import pyarrow as pa

from slimm.errors import InputError

DEFAULT_PROMPT = "Describe this image."
STOP_TOKENS = (151643, 151645)  # <|endoftext|>, <|im_end|>: what `slimm generate` stops on
RETRIES = 3  # times a batch is rerun after its worker process died
INPUTS, FAILED = "_inputs", "_error"  # columns the read stage adds and the model stage consumes

ANSWER_SCHEMA = pa.schema(
    [
        ("answer", pa.string()),  # the text `slimm generate` prints for the row; null on error
        ("prompt_tokens", pa.int64()),  # the row's own prompt, images' tokens included, padding not
        ("completion_tokens", pa.int64()),  # tokens generated, the stop token included
        ("seconds", pa.float64()),  # wall time of the generate call that answered the row's batch
        ("error", pa.string()),  # null, or why the row has no answer
    ]
)


def model_path(model: str | None, backend: str):
    """What a worker loads, resolved where it runs: hub ids download to that machine's cache, and
    the demo model is built there if it is not in that machine's cache yet."""
    from slimm.cache import demo_dir_for
    from slimm.hub import resolve_model

    return resolve_model(model) if model else demo_dir_for(backend)


# ---- read stage: open and preprocess each row ----------------------------------------------------------------
@functools.cache
def _processor(model: str | None, backend: str):
    from slimm.processing import Processor

    return Processor.from_pretrained(model_path(model, backend))


def _column(batch: pa.Table, name: str) -> list:
    if name not in batch.column_names:
        return [None] * batch.num_rows
    column = batch.column(name)
    if isinstance(column.type, pa.ExtensionType):  # Ray's tensor columns (ray.data.read_images)
        from ray.data.block import BlockAccessor

        return list(BlockAccessor.for_block(batch.select([name])).to_numpy(name))
    return column.to_pylist()


def _image(value: Any, what: str):
    from PIL import Image

    from slimm.processing import load_image

    if isinstance(value, np.ndarray):  # an H x W x 3 array, as ray.data.read_images gives
        value = Image.fromarray(value.astype(np.uint8) if value.dtype != np.uint8 else value)
    elif isinstance(value, dict) and "bytes" in value:  # Hugging Face datasets' image cells
        value = value["bytes"]
    return load_image(value, what)


def _media(image, images, video) -> tuple[list, list]:
    from slimm.processing.messages import fetch_video

    if image is None and images is None and video is None:
        raise InputError("the row has no image, images or video")
    pictures = [] if image is None else [image]
    pictures += list(images) if images is not None else []
    loaded = [_image(p, "image") for p in pictures]
    # the same video reading as `slimm generate --video`: a file through PyAV, or a folder of frames
    videos = [] if video is None else [fetch_video({"type": "video", "video": str(video)})]
    return loaded, videos


def pack(inputs: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **inputs)
    return buf.getvalue()


def unpack(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def prepare_batch(batch: pa.Table, model: str | None, backend: str, prompt: str) -> pa.Table:
    """The read stage: each row's image(s) / video opened and preprocessed, its chat prompt tokenized;
    the checked model inputs travel packed in one binary column, or the row's error in another."""
    from slimm.backends.base import chat_inputs, normalize_inputs

    processor = _processor(model, backend)
    blobs, errors = [], []
    columns = zip(
        _column(batch, "image"),
        _column(batch, "images"),
        _column(batch, "video"),
        _column(batch, "prompt"),
        strict=True,
    )
    for image, images, video, own_prompt in columns:
        try:
            pictures, videos = _media(image, images, video)
            inputs = normalize_inputs(chat_inputs(processor, own_prompt or prompt, pictures, videos))
            blobs.append(pack(inputs))
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - a bad row is reported in its error column; the job goes on
            blobs.append(None)
            errors.append(describe_error(e))
    batch = batch.drop_columns([c for c in (INPUTS, FAILED) if c in batch.column_names])
    return batch.append_column(INPUTS, pa.array(blobs, pa.binary())).append_column(
        FAILED, pa.array(errors, pa.string())
    )


def describe_error(e: Exception) -> str:
    from slimm.errors import SliMMError

    return str(e) if isinstance(e, SliMMError) else f"{type(e).__name__}: {e}"


# ---- model stage: answer batches of prepared rows -----------------------------------------------------------
def collate(rows: list[dict[str, np.ndarray]], pad_token_id: int) -> dict[str, np.ndarray]:
    """Prepared rows (batch 1 each) -> one left-padded batch, the layout Processor gives a list of
    prompts: ids end at the last column, visual rows and grids concatenated in row order."""
    longest = max(r["input_ids"].shape[1] for r in rows)
    ids = np.full((len(rows), longest), pad_token_id, np.int64)
    mask = np.zeros((len(rows), longest), np.int64)
    for i, r in enumerate(rows):
        n = r["input_ids"].shape[1]
        ids[i, longest - n :] = r["input_ids"][0]
        mask[i, longest - n :] = r["attention_mask"][0]
    out = {"input_ids": ids, "attention_mask": mask}
    for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [r[name] for r in rows if name in r]
        if parts:
            out[name] = np.concatenate(parts, axis=0)
    return out


class ModelWorker:
    """One model per actor, loaded in the constructor; each call answers a batch of prepared rows.
    Greedy only: the same row gives the same answer on any worker, so a retried batch changes nothing."""

    def __init__(
        self,
        model: str | None,
        backend: str,
        max_new_tokens: int,
        stop_tokens: tuple[int, ...] = STOP_TOKENS,
        load_kwargs: dict | None = None,
        threads: int | None = None,
    ) -> None:
        import slimm
        from slimm.batch.cluster import set_threads

        load_kwargs = set_threads(backend, threads, load_kwargs or {})
        self.backend = slimm.load(model_path(model, backend), backend=backend, **load_kwargs)
        if self.backend.processor is None:
            raise InputError(f"{model}: no tokenizer files, so a text prompt cannot be encoded")
        self.gen = self.backend.generation_config(
            max_new_tokens=max_new_tokens, eos_token_id=list(stop_tokens)
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        from slimm.backends.base import normalize_inputs

        n = batch.num_rows
        answer, prompt_tokens, completion_tokens = [None] * n, [None] * n, [None] * n
        seconds, error = [0.0] * n, list(_column(batch, FAILED))
        ready: list[tuple[int, dict[str, np.ndarray]]] = []
        for i, blob in enumerate(_column(batch, INPUTS)):
            if error[i] is not None:
                continue
            try:
                inputs = normalize_inputs(unpack(blob), self.backend.config)
                self._check_length(inputs)
                ready.append((i, inputs))
            except Exception as e:  # noqa: BLE001 - the row's error, not the batch's
                error[i] = describe_error(e)
        for group in self._groups(ready):
            for i, result in self._answer(group):
                if isinstance(result, str):
                    error[i] = result
                else:
                    answer[i], prompt_tokens[i], completion_tokens[i], seconds[i] = result
        columns = [answer, prompt_tokens, completion_tokens, seconds, error]
        batch = batch.drop_columns([INPUTS, FAILED])
        for field, values in zip(ANSWER_SCHEMA, columns, strict=True):
            if field.name in batch.column_names:
                batch = batch.drop_columns([field.name])
            batch = batch.append_column(field, pa.array(values, field.type))
        return batch

    def _check_length(self, inputs: dict[str, np.ndarray]) -> None:
        n = inputs["input_ids"].shape[1]
        if n >= self.gen.max_seq_len:
            raise InputError(
                f"the prompt has {n} tokens, which leaves no room under the maximum sequence length "
                f"{self.gen.max_seq_len} (a smaller image or a shorter prompt)"
            )

    def _groups(self, ready: list) -> list[list]:
        """Rows that batch together without changing anyone's answer: padded to the longest prompt, a
        row whose prompt + max_new_tokens would pass the sequence limit would be cut shorter than it is
        alone, so such rows run alone."""
        limit, steps = self.gen.max_seq_len, self.gen.max_new_tokens
        fits = [r[1]["input_ids"].shape[1] + steps <= limit for r in ready]
        together = [r for r, ok in zip(ready, fits, strict=True) if ok]
        return ([together] if together else []) + [[r] for r, ok in zip(ready, fits, strict=True) if not ok]

    def _answer(self, group: list) -> list[tuple[int, tuple | str]]:
        from slimm.generate import generate

        rows = [inputs for _, inputs in group]
        try:
            t0 = time.perf_counter()
            with self.backend.lock:
                out = generate(self.backend, collate(rows, self.backend.processor.pad_token_id), self.gen)
            took = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - find the row that broke the batch: each alone
            if len(group) == 1:
                return [(group[0][0], describe_error(e))]
            return [result for row in group for result in self._answer([row])]
        start = out.sequences.shape[1] - len(out.logits)
        return [
            (i, self._text(out.sequences[k, start:], rows[k]["input_ids"].shape[1], took))
            for k, (i, _) in enumerate(group)
        ]

    def _text(self, new: np.ndarray, prompt_tokens: int, took: float) -> tuple[str, int, int, float]:
        from slimm.generate import StreamDecoder

        # the pieces `slimm generate` streams, joined: the same text, byte for byte
        decoder, pieces, count = StreamDecoder(self.backend.processor.tokenizer), [], 0
        for tok in new.tolist():
            count += 1
            if tok in self.gen.stop_tokens:
                break
            pieces.append(decoder.push(tok))
        return "".join(pieces), prompt_tokens, count, took


def answer_dataset(
    ds,
    model: str | None = None,
    backend: str = "torch",
    *,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 128,
    workers: int = 1,
    batch_size: int = 8,
    stop_tokens: tuple[int, ...] = STOP_TOKENS,
    worker_cpus: float | None = None,
    read_cpus: float | None = None,
    **load_kwargs,
):
    """A ray.data.Dataset with an `image` (path, bytes or H x W x 3 array), `images` (list) or `video`
    column and optionally `prompt` -> the same rows plus answer, prompt_tokens, completion_tokens,
    seconds and error (greedy answers; a bad row gets its error and no answer). `workers` actors each
    load the model once; `model` None is the built-in demo model of `backend`. Each worker reserves
    `worker_cpus` CPUs (default: the cluster's, less the read stage's, split between the workers; see
    cpus_per_worker) and runs that many framework threads unless `threads` says otherwise; the read
    stage runs at most `workers` tasks at a time (preprocessing is a few percent of the model's work),
    each reserving `read_cpus`."""
    from slimm.batch.cluster import connect, worker_share
    from slimm.batch.cluster import read_cpus as default_read_cpus
    from slimm.generate import check_generation_settings

    check_generation_settings(max_new_tokens)
    if not (isinstance(workers, int) and workers >= 1):
        raise InputError(f"workers must be an integer >= 1, got {workers!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    ray = connect()
    read = read_cpus if read_cpus is not None else default_read_cpus(ray)
    worker_cpus, threads = worker_share(ray, workers, read, worker_cpus, load_kwargs)
    prepared = ds.map_batches(
        prepare_batch,
        batch_format="pyarrow",
        batch_size=batch_size,
        fn_kwargs={"model": model, "backend": backend, "prompt": prompt},
        num_cpus=read,
        concurrency=workers,
    )
    with warnings.catch_warnings():
        # Ray 2.60 asks for named parameters in place of ray_remote_args, and has none for the two below
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
        return prepared.map_batches(
            ModelWorker,
            batch_format="pyarrow",
            batch_size=batch_size,
            fn_constructor_kwargs={
                "model": model,
                "backend": backend,
                "max_new_tokens": max_new_tokens,
                "stop_tokens": tuple(stop_tokens),
                "load_kwargs": load_kwargs,
                "threads": threads,
            },
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=worker_cpus,
            # a killed worker is replaced and its batches rerun; a batch that kills RETRIES workers fails
            # (run_batch answers its rows again one by one); given here, they also keep the read stage
            # in tasks of its own rather than fused into the workers
            max_restarts=-1,
            max_task_retries=RETRIES,
        )
