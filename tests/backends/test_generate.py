"""The shared generation loop on a scripted fake backend: samplers, stop tokens, limits, streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimm.errors import InputError
from slimm.generate import (
    GenerationConfig,
    StreamDecoder,
    generate,
    generate_step,
    make_logits_processors,
    make_sampler,
    stream_generate,
)

V = 256


class ScriptedBackend:
    """Logits that put the most mass on a scripted token per step and per sequence."""

    max_seq_len = 4096  # positions its (imaginary) KV cache holds: the loop checks requests against it

    def __init__(self, script: list[list[int]]) -> None:
        self.script = script  # [step][batch]
        self.step = 0
        self.calls: list[str] = []

    def _logits(self) -> np.ndarray:
        rows = self.script[min(self.step, len(self.script) - 1)]
        out = np.zeros((len(rows), V), np.float32)
        for b, t in enumerate(rows):
            out[b, t] = 5.0
        return out

    def prefill(self, inputs, capacity):
        self.calls.append(f"prefill {capacity}")
        self.step = 0
        return self._logits()

    def decode(self, tokens):
        self.calls.append(f"decode {tokens.tolist()}")
        self.step += 1
        return self._logits()


def ids(b=1, s=3):
    return {"input_ids": np.arange(b * s, dtype=np.int64).reshape(b, s) + 1}


def test_greedy_follows_the_script_and_stops_on_a_stop_token():
    be = ScriptedBackend([[7], [8], [2], [9]])
    out = generate(be, ids(), GenerationConfig(max_new_tokens=10, stop_tokens=(2,), pad_token_id=0))
    assert out.sequences[0, 3:].tolist() == [7, 8, 2]
    assert len(out.logits) == 3
    assert be.calls == ["prefill 13", "decode [7]", "decode [8]"]  # no decode after the stop


def test_finished_sequences_get_pad_until_all_stop():
    be = ScriptedBackend([[2, 5], [6, 6], [7, 2]])
    out = generate(be, ids(2), GenerationConfig(max_new_tokens=10, stop_tokens=(2,), pad_token_id=0))
    assert out.sequences[:, 3:].tolist() == [[2, 0, 0], [5, 6, 2]]


def test_max_new_tokens_and_max_seq_len():
    be = ScriptedBackend([[7]])
    assert generate(be, ids(), GenerationConfig(max_new_tokens=4, stop_tokens=())).sequences.shape == (1, 7)
    # the sequence limit caps new tokens: 3 prompt + 2 = 5
    assert generate(
        be, ids(), GenerationConfig(max_new_tokens=4, stop_tokens=(), max_seq_len=5)
    ).sequences.shape == (1, 5)
    with pytest.raises(InputError, match="maximum sequence length 3"):
        list(generate_step(be, ids(), GenerationConfig(max_seq_len=3)))


def test_sampler_temperature_zero_is_argmax():
    logits = np.random.default_rng(0).standard_normal((4, V)).astype(np.float32)
    np.testing.assert_array_equal(make_sampler(0.0)(logits), logits.argmax(-1))


def test_top_k_and_top_p_restrict_the_support():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((1, V)).astype(np.float32) * 3
    top3 = set(np.argsort(-logits[0])[:3].tolist())
    draws = {int(make_sampler(1.0, top_k=3, seed=s)(logits)[0]) for s in range(200)}
    assert draws <= top3 and len(draws) > 1
    # top_p: the smallest set whose mass reaches p
    p = np.exp(logits[0] - logits[0].max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = set(order[: int(np.searchsorted(np.cumsum(p[order]), 0.5) + 1)].tolist())
    draws = {int(make_sampler(1.0, top_p=0.5, seed=s)(logits)[0]) for s in range(200)}
    assert draws <= keep


def test_sampling_is_reproducible_with_a_seed():
    logits = np.zeros((2, V), np.float32)
    a = [make_sampler(1.0, seed=3)(logits).tolist() for _ in range(3)]
    b = [make_sampler(1.0, seed=3)(logits).tolist() for _ in range(3)]
    assert a == b


def test_repetition_penalty_matches_transformers():
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((2, V)).astype(np.float32)
    seen = rng.integers(0, V, (2, 7))
    ours = make_logits_processors(1.3)[0](seen, logits)
    ref = transformers.RepetitionPenaltyLogitsProcessor(1.3)(
        torch.from_numpy(seen), torch.from_numpy(logits.copy())
    )
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)


def test_bad_settings_are_clear_errors():
    for kw, word in (
        (dict(top_p=0), "top_p"),
        (dict(temperature=-1), "temperature"),
        (dict(max_new_tokens=-2), "max_new_tokens"),
        (dict(repetition_penalty=0), "repetition"),
    ):
        with pytest.raises(InputError, match=word):
            GenerationConfig(**kw)


class CharTokenizer:
    """Decodes ids as UTF-8 bytes, so a character can span several tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def test_stream_decoder_holds_back_incomplete_characters():
    dec = StreamDecoder(CharTokenizer())
    pieces = [dec.push(b) for b in "aé€".encode()]
    assert pieces == ["a", "", "é", "", "", "€"]


def test_stream_generate_yields_text_and_hides_the_stop_token():
    text = "hi!"
    script = [[b] for b in text.encode()] + [[2]]
    be = ScriptedBackend(script)
    got = list(
        stream_generate(be, ids(), CharTokenizer(), GenerationConfig(stop_tokens=(2,), max_new_tokens=9))
    )
    assert "".join(got) == text
