"""Ray Data against a running server: a `map_batches` callable class that sends each row to an
OpenAI-compatible endpoint (`slimm serve`, `slimm serve --ray`, or any other) with the `openai` client,
for when the model already runs behind HTTP and the job should not load it again.
"""

from __future__ import annotations

import base64
import mimetypes
from pathlib import Path

import pyarrow as pa

from slimm.batch.pipeline import DEFAULT_PROMPT


def image_url(path: str) -> str:
    """A local image as the inline data: URL `slimm serve` accepts."""
    kind = mimetypes.guess_type(path)[0] or "image/png"
    return f"data:{kind};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


class ChatClient:
    """`ds.map_batches(ChatClient, fn_constructor_kwargs={"base_url": ...}, ...)`: rows with a `prompt`
    and optionally an `image` path -> the same rows plus `answer`, `completion_tokens` and `error`."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str = "none",
        max_tokens: int = 128,
        prompt: str = DEFAULT_PROMPT,
    ) -> None:
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key=api_key)
        self.model = model or self.client.models.list().data[0].id
        self.max_tokens, self.prompt = max_tokens, prompt

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = batch.column("prompt").to_pylist() if "prompt" in batch.column_names else []
        images = batch.column("image").to_pylist() if "image" in batch.column_names else []
        answers, tokens, errors = [], [], []
        for i in range(batch.num_rows):
            content = [{"type": "text", "text": (prompts[i] if prompts else None) or self.prompt}]
            if images and images[i]:
                content.insert(0, {"type": "image_url", "image_url": {"url": image_url(images[i])}})
            try:
                r = self.client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": content}],
                    max_tokens=self.max_tokens,
                    temperature=0,
                )
                answers.append(r.choices[0].message.content)
                tokens.append(r.usage.completion_tokens)
                errors.append(None)
            except Exception as e:  # noqa: BLE001 - the row's error (a 400 for a bad image); the job goes on
                answers.append(None)
                tokens.append(None)
                errors.append(f"{type(e).__name__}: {e}")
        return (
            batch.append_column("answer", pa.array(answers, pa.string()))
            .append_column("completion_tokens", pa.array(tokens, pa.int64()))
            .append_column("error", pa.array(errors, pa.string()))
        )
