"""The chat template: Qwen2-VL's default, a checkpoint's own (read from its files), and rendering
a conversation with it in a sandboxed jinja environment, as transformers does.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from slimm.config import read_json
from slimm.errors import CheckpointError, InputError

# Renders exactly what Qwen2-VL's chat_template.json renders.
QWEN2_VL_CHAT_TEMPLATE = (
    "{%- set seen = namespace(images=0, videos=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{%- set seen.images = seen.images + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' ~ seen.images ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{%- set seen.videos = seen.videos + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' ~ seen.videos ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@functools.lru_cache(maxsize=8)
def _compile_template(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which chat templates do not want
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise CheckpointError(f"chat template does not parse: {e.message} (line {e.lineno})") from None


def apply_chat_template(
    template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
) -> str:
    """Render one conversation with a jinja chat template, as transformers does."""
    import jinja2

    if not isinstance(messages, list | tuple) or not all(isinstance(m, dict) for m in messages):
        raise InputError("messages: expected a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise InputError("messages: the conversation is empty")
    for i, m in enumerate(messages):
        if "role" not in m or "content" not in m:
            raise InputError(f"message {i} needs both 'role' and 'content', got keys {sorted(m)}")
    compiled = _compile_template(template)
    try:
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.exceptions.TemplateError as e:
        raise InputError(f"chat template failed on these messages: {e}") from None


def load_chat_template(ckpt_dir: Path) -> str:
    file = ckpt_dir / "chat_template.json"
    if file.exists():
        template = read_json(file).get("chat_template")
        if isinstance(template, str) and template:
            return template
    file = ckpt_dir / "chat_template.jinja"  # transformers >= 4.50 writes the template on its own
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = read_json(ckpt_dir / "tokenizer_config.json", required=False).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template:
        return template
    return QWEN2_VL_CHAT_TEMPLATE
