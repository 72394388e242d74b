"""The one generation loop shared by every backend: prefill, decode steps, samplers, stop tokens,
streaming. Backends only turn token ids into logits; everything else happens here, in NumPy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from slimm.config import DEFAULT_MAX_SEQ_LEN
from slimm.errors import InputError

Sampler = Callable[[np.ndarray], np.ndarray]  # logits (B, V) -> tokens (B,)
LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (tokens so far (B, T), logits) -> logits


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    stop_tokens: tuple[int, ...] = (151645, 151643)
    pad_token_id: int = 151643
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN  # prompt + generated tokens
    seed: int | None = None

    def __post_init__(self) -> None:
        check_generation_settings(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            max_seq_len=self.max_seq_len,
            seed=self.seed,
        )


def check_generation_settings(
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    max_seq_len: int | None = None,
    seed: int | None = None,
) -> None:
    """The one set of checks for generation settings (API and CLI alike); None means "not given".

    Written as `not (x >= 0)` so that NaN fails them too: NaN compares false with everything."""
    if max_new_tokens is not None and not _int(max_new_tokens) >= 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if temperature is not None and not (math.isfinite(_float(temperature)) and temperature >= 0):
        raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and not _int(top_k) >= 0:
        raise InputError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if top_p is not None and not 0 < _float(top_p) <= 1:
        raise InputError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if repetition_penalty is not None and not (
        math.isfinite(_float(repetition_penalty)) and repetition_penalty > 0
    ):
        raise InputError(
            f"repetition_penalty must be a finite number > 0 (1 = off), got {repetition_penalty!r}"
        )
    if max_seq_len is not None and not _int(max_seq_len) >= 1:
        raise InputError(f"max_seq_len must be an integer >= 1, got {max_seq_len!r}")
    if seed is not None and not 0 <= _int(seed) < 2**63:
        raise InputError(f"seed must be an integer in [0, 2**63), got {seed!r}")


def _int(x) -> float:
    """x if it is an integer (bool excluded), else NaN so that every check on it fails."""
    return x if isinstance(x, int | np.integer) and not isinstance(x, bool) else math.nan


def _float(x) -> float:
    return (
        float(x)
        if isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)
        else math.nan
    )


def position_limit(backend) -> int:
    """Positions the loaded model can hold: an export's max_seq_len (its KV cache was sized for it), a
    checkpoint's max_position_embeddings."""
    return getattr(backend, "max_seq_len", None) or backend.config.text.max_position_embeddings


@dataclass
class GenerationStats:
    """Filled in by generate_step as it runs: what `slimm generate` reports on its last line."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token: float = 0.0  # seconds: prefill and the first sampled token
    decode_seconds: float = 0.0  # the steps after the first token

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def make_sampler(
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None
) -> Sampler:
    """Temperature 0 means argmax; otherwise top-k, then top-p, then a draw (transformers' order)."""
    if temperature == 0:
        return lambda logits: logits.argmax(-1).astype(np.int64)
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> np.ndarray:
        x = logits.astype(np.float64) / temperature
        if top_k > 0 and top_k < x.shape[-1]:
            kth = np.partition(x, -top_k, axis=-1)[:, -top_k][:, None]
            x = np.where(x < kth, -np.inf, x)
        if top_p < 1.0:
            order = np.argsort(-x, axis=-1)
            probs = _softmax(np.take_along_axis(x, order, -1))
            # drop tokens once the mass before them already reaches top_p (keep at least one)
            drop_sorted = (np.cumsum(probs, -1) - probs) >= top_p
            drop = np.zeros_like(drop_sorted)
            np.put_along_axis(drop, order, drop_sorted, -1)
            x = np.where(drop, -np.inf, x)
        probs = _softmax(x)
        return np.array([rng.choice(p.shape[0], p=p) for p in probs], dtype=np.int64)

    return sample


def make_logits_processors(repetition_penalty: float = 1.0) -> list[LogitsProcessor]:
    procs: list[LogitsProcessor] = []
    if repetition_penalty != 1.0:

        def penalize(tokens: np.ndarray, logits: np.ndarray) -> np.ndarray:
            # CTRL-style, as transformers: divide positive scores, multiply negative ones
            out = logits.copy()
            for b in range(tokens.shape[0]):
                seen = np.unique(tokens[b])
                s = out[b, seen]
                out[b, seen] = np.where(s > 0, s / repetition_penalty, s * repetition_penalty)
            return out

        procs.append(penalize)
    return procs


@dataclass
class GenerateOutput:
    sequences: np.ndarray  # (B, S + n): prompt, then generated tokens (pad after a stop)
    logits: list[np.ndarray] = field(default_factory=list)  # n raw (B, V) per-step logits


def generate_step(
    backend, inputs: dict[str, np.ndarray], cfg: GenerationConfig, stats: GenerationStats | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (tokens (B,), raw logits (B, V)) per step until every sequence stopped or a limit is hit."""
    ids = inputs["input_ids"]
    B, S = ids.shape
    limit = position_limit(backend)
    for name, value in (("max_new_tokens", cfg.max_new_tokens), ("max_seq_len", cfg.max_seq_len)):
        if value > limit:  # before a KV cache of that many positions is allocated
            raise InputError(f"{name} {value} is more than the {limit} positions this model holds")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = S
    t0 = time.perf_counter()
    if S >= cfg.max_seq_len:
        raise InputError(
            f"the prompt has {S} tokens, which leaves no room under the maximum sequence length "
            f"{cfg.max_seq_len} (raise --max-seq-len or shorten the prompt / lower the image resolution)"
        )
    steps = min(cfg.max_new_tokens, cfg.max_seq_len - S)
    if steps == 0:
        return
    sampler = make_sampler(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
    procs = make_logits_processors(cfg.repetition_penalty)
    stop = np.array(sorted(cfg.stop_tokens), dtype=np.int64)
    history = ids.astype(np.int64)
    done = np.zeros(B, dtype=bool)
    logits = backend.prefill(inputs, capacity=S + steps)
    for step in range(steps):
        raw = logits
        for p in procs:
            logits = p(history, logits)
        tokens = sampler(logits)
        tokens = np.where(done, cfg.pad_token_id, tokens).astype(np.int64)
        done |= np.isin(tokens, stop)
        history = np.concatenate([history, tokens[:, None]], axis=1)
        now = time.perf_counter()
        if step == 0:
            stats.time_to_first_token, t0 = now - t0, now
        else:
            stats.decode_seconds = now - t0
        stats.new_tokens = step + 1
        yield tokens, raw
        if done.all() or step == steps - 1:
            return
        logits = backend.decode(tokens)


def generate(backend, inputs: dict[str, np.ndarray], cfg: GenerationConfig) -> GenerateOutput:
    toks, logits = [], []
    for t, raw in generate_step(backend, inputs, cfg):
        toks.append(t)
        logits.append(raw)
    new = np.stack(toks, 1) if toks else np.zeros((inputs["input_ids"].shape[0], 0), np.int64)
    return GenerateOutput(np.concatenate([inputs["input_ids"].astype(np.int64), new], 1), logits)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece


def stream_generate(
    backend,
    inputs: dict[str, np.ndarray],
    tokenizer,
    cfg: GenerationConfig,
    stats: GenerationStats | None = None,
) -> Iterator[str]:
    """Text pieces of the first (or only) sequence as they are produced; stop tokens are not shown."""
    if inputs["input_ids"].shape[0] != 1:
        raise InputError("stream_generate takes one prompt; use generate() for batches")
    dec = StreamDecoder(tokenizer)
    stop = set(cfg.stop_tokens)
    for tokens, _ in generate_step(backend, inputs, cfg, stats):
        if int(tokens[0]) in stop:
            return
        piece = dec.push(int(tokens[0]))
        if piece:
            yield piece
