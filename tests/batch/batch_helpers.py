"""Helpers of the Ray tests: the settings they share, a row answered as `slimm generate` answers it,
an OUT file's rows."""

from __future__ import annotations

import json

BACKEND = "onnx"  # the demo export: the fastest demo model to load in each worker
MAX_NEW_TOKENS = 24
PROMPT = "Describe this image."
SIZES = [(56, 56), (84, 112), (140, 84), (224, 224), (56, 168), (112, 112), (100, 60), (200, 150)]


def generate_answer(model, image, prompt: str = PROMPT, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The text `slimm generate --image IMAGE --prompt PROMPT` prints for one row (greedy)."""
    from slimm.batch.pipeline import STOP_TOKENS

    images = image if isinstance(image, list) else [image]
    return "".join(
        model.stream(
            prompt, [str(p) for p in images], max_new_tokens=max_new_tokens, eos_token_id=list(STOP_TOKENS)
        )
    )


def read_out(path) -> list[dict]:
    import pyarrow.parquet as pq

    if str(path).endswith(".jsonl"):
        return [json.loads(line) for line in open(path, encoding="utf-8")]
    return pq.read_table(path).to_pylist()
