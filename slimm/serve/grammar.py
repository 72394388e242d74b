"""Constrained decoding for `response_format`: JSON schemas compiled by llguidance into a grammar, and
one matcher per answer that masks the logits before sampling and advances with each accepted token.

Why llguidance (not xgrammar or outlines-core): it is maintained (the guidance project; llama.cpp, vLLM
and SGLang use it), takes JSON Schema directly and refuses a bad one with a message, computes a token
mask lazily in tens of microseconds without precomputing the vocabulary per grammar, and needs neither
torch nor transformers: the tokenizer is built from the tokenizer.json the processor already reads,
and the mask is a NumPy bitmask, so it works the same under every backend.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from slimm.errors import InputError

# compact JSON: a model (a random-weight one above all) cannot wander off into endless whitespace
_OPTIONS = {"whitespace_flexible": False}


class Grammars:
    """The llguidance tokenizer of one model (built once, on first use: about a second) and the
    grammars compiled against it."""

    def __init__(self, tokenizer, vocab_size: int, eos_token: int) -> None:
        self._tokenizer = tokenizer  # slimm.processing.tokenizer.Tokenizer
        self._vocab_size = vocab_size  # the model's logits width (may exceed the tokenizer's)
        self._eos = eos_token
        self._ll = None
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self):
        with self._lock:
            if self._ll is None:
                try:
                    import llguidance
                except ImportError:
                    raise InputError(
                        "response_format needs the llguidance package (pip install 'slimm[serve]')"
                    ) from None
                # the tokenizers JSON is what llguidance's own hf.from_tokenizer passes on; taken from
                # the Tokenizer the processor already holds, so no transformers import is needed
                self._ll = llguidance.LLTokenizer(
                    self._tokenizer._tk.to_str(), n_vocab=self._vocab_size, eos_token=self._eos
                )
            return self._ll

    def compile(self, response_format: dict[str, Any] | None) -> str | None:
        """An OpenAI response_format -> an llguidance grammar (None for plain text); InputError naming
        the problem when the schema cannot be compiled."""
        import llguidance

        kind = (response_format or {}).get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            schema: Any = {"type": "object"}
        elif kind == "json_schema":
            spec = response_format.get("json_schema") or {}
            schema = spec.get("schema")
            if schema is None:
                schema = {}  # OpenAI: no schema given means any JSON value
            if not isinstance(schema, dict | bool):
                raise InputError(
                    f"response_format.json_schema.schema must be a JSON object, got {schema!r:.60}"
                )
        else:
            raise InputError(f"response_format.type {kind!r} is not one of text, json_object, json_schema")
        if isinstance(schema, dict):
            schema = {**schema, "x-guidance": {**_OPTIONS, **schema.get("x-guidance", {})}}
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
            error = llguidance.LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        except (ValueError, TypeError, RuntimeError) as e:
            error = str(e)
        if error:
            raise InputError(f"response_format: the JSON schema cannot be used: {error}")
        return grammar

    def matcher(self, grammar: str) -> Constraint:
        return Constraint(self.ll_tokenizer, grammar, self._vocab_size)


class Constraint:
    """One answer's place in its grammar: which tokens may come next, and whether it is complete."""

    def __init__(self, ll_tokenizer, grammar: str, vocab_size: int) -> None:
        import llguidance
        import llguidance.numpy as lln

        self._lln = lln
        self._m = llguidance.LLMatcher(ll_tokenizer, grammar)
        if self._m.is_error():
            raise InputError(f"response_format: {self._m.get_error()}")
        self._bits = lln.allocate_token_bitmask(1, vocab_size)
        self._vocab = vocab_size

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Logits (1, V) with every token the grammar forbids next at -inf."""
        self._lln.fill_next_token_bitmask(self._m, self._bits, 0)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: logits.shape[-1]]
        return np.where(allowed.astype(bool)[None], logits, -np.inf)

    def accept(self, token: int) -> None:
        if not self._m.consume_token(token):
            # cannot happen for a token the mask allowed; fail this answer, not the engine
            raise RuntimeError(f"the grammar refused token {token}: {self._m.get_error()}")

    @property
    def complete(self) -> bool:
        """Nothing but the end may follow (the JSON value is closed)."""
        return self._m.is_stopped()


def response_format_dict(response_format) -> dict[str, Any] | None:
    """The protocol model as the plain dict `Grammars.compile` reads (its `schema` key by its wire name)."""
    if response_format is None:
        return None
    return json.loads(response_format.model_dump_json(by_alias=True, exclude_none=True))
