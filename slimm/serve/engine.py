"""Continuous batching: one engine loop per model, on its own thread, over the backend's KV slots.

Requests wait in a bounded queue, join the running batch at step boundaries (a prefill into a free
slot), decode together one token a step, and leave when finished without stalling the rest.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from slimm.config import DEFAULT_MAX_SEQ_LEN
from slimm.errors import InputError, SliMMError
from slimm.generate import (
    StreamDecoder,
    check_generation_settings,
    make_logits_processors,
    make_sampler,
    position_limit,
)
from slimm.serve.grammar import Grammars
from slimm.serve.metrics import Metrics
from slimm.serve.visual_cache import VisualCache

log = logging.getLogger("slimm.serve")


class QueueFull(SliMMError):
    """The waiting queue is at its bound: the client should retry later."""


class EngineStopped(SliMMError):
    """The engine is shutting down and takes no more requests."""


@dataclass(frozen=True)
class SamplingParams:
    """One request's own settings; checked by slimm.generate's one set of checks."""

    max_tokens: int | None = None  # None: as many as the slot has room for
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # strings that end the answer (not shown)
    stop_tokens: tuple[int, ...] | None = None  # None: the model's end-of-sequence tokens
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: str | None = None  # an llguidance grammar the answer must follow (response_format)

    def __post_init__(self) -> None:
        check_generation_settings(
            self.max_tokens,
            self.temperature,
            self.top_k,
            self.top_p,
            self.repetition_penalty,
            None,
            self.seed,
        )
        if self.max_tokens == 0:
            raise InputError("max_tokens must be >= 1")


@dataclass
class TokenInfo:
    token: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]]  # (token, text, logprob), likeliest first


@dataclass
class Delta:
    """New answer text (may be empty while a possible stop string is held back) and its tokens."""

    text: str
    tokens: list[TokenInfo] = field(default_factory=list)


@dataclass
class Finished:
    reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    status: int  # the HTTP status it becomes: 500 for an internal failure, 503 when shutting down
    message: str


Event = Delta | Finished | Failed


class Request:
    """A prompt (normalized model inputs, batch 1), its settings and where its events go: `emit`, or
    by default a queue read with `events()`."""

    _ids = itertools.count()

    def __init__(
        self,
        inputs: dict[str, np.ndarray],
        params: SamplingParams,
        emit: Callable[[Event], None] | None = None,
    ) -> None:
        if inputs["input_ids"].shape[0] != 1:
            raise InputError(f"a request holds one prompt, got a batch of {inputs['input_ids'].shape[0]}")
        self.id = next(self._ids)
        self.inputs = inputs
        self.params = params
        self.prompt_tokens = int(inputs["input_ids"].shape[1])
        self._queue: queue.Queue[Event] | None = None
        if emit is None:
            self._queue = queue.Queue()
            emit = self._queue.put
        self.emit = emit
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.submitted = time.monotonic()

    def cancel(self) -> None:
        """The client went away: the engine frees its slot at the next step boundary."""
        self.cancelled.set()

    def events(self, timeout: float = 600.0) -> Iterator[Event]:
        """Events until Finished or Failed (only for requests made without `emit`)."""
        assert self._queue is not None, "this request sends its events to its own emit"
        while True:
            ev = self._queue.get(timeout=timeout)
            yield ev
            if isinstance(ev, Finished | Failed):
                return


class _Running:
    """Engine-side state of a request in a slot."""

    def __init__(self, req: Request, engine: Engine) -> None:
        p = req.params
        self.req = req
        self.sampler = make_sampler(p.temperature, p.top_k, p.top_p, p.seed)
        self.procs = make_logits_processors(p.repetition_penalty)
        self.history = req.inputs["input_ids"].astype(np.int64)  # (1, S + generated)
        self.limit = min(p.max_tokens or engine.capacity, engine.capacity - req.prompt_tokens)
        self.stop_tokens = set(engine.stop_tokens if p.stop_tokens is None else p.stop_tokens)
        self.decoder = StreamDecoder(engine.tokenizer) if engine.tokenizer is not None else None
        self.text = ""  # decoded so far
        self.sent = 0  # characters of `text` already emitted
        self.generated = 0
        self.last = -1
        self.last_time = 0.0
        # the grammar's matcher: masks the logits before each draw, advanced by each accepted token
        self.constraint = engine.grammars.matcher(p.grammar) if p.grammar else None


class Engine:
    """Owns one backend's KV pool of `max_batch` slots of `capacity` positions each, and the thread that
    runs it. `submit` is thread-safe; events reach each request's `emit` from the engine thread."""

    def __init__(
        self,
        backend,
        max_batch: int = 8,
        max_queue: int = 64,
        capacity: int | None = None,
        tokenizer=None,
        visual_cache_mb: float = 256,
    ) -> None:
        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise InputError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not (isinstance(max_queue, int) and max_queue >= 0):
            raise InputError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        limit = position_limit(backend)
        # a checkpoint allows max_position_embeddings (32k and more): a pool of that many positions per
        # slot is needlessly large, so a checkpoint gets the CLI's default unless told
        self.capacity = capacity or (
            backend.max_seq_len if getattr(backend, "max_seq_len", None) else min(limit, DEFAULT_MAX_SEQ_LEN)
        )
        if not 1 <= self.capacity <= limit:
            raise InputError(
                f"capacity {self.capacity} is outside 1..{limit}, the positions this model holds"
            )
        if not (isinstance(visual_cache_mb, int | float) and visual_cache_mb >= 0):
            raise InputError(f"visual_cache_mb must be a number >= 0 (0: off), got {visual_cache_mb!r}")
        self.backend = backend
        # every image's encoder output by content, so that a chat's next turn re-sending it skips the
        # vision encoder; set on the backend, whose prefill consults it
        backend.visual_cache = (
            VisualCache(int(visual_cache_mb * 2**20), backend.config.spatial_merge_size)
            if visual_cache_mb
            else None
        )
        self.visual_cache = backend.visual_cache
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.tokenizer = tokenizer or (backend.processor.tokenizer if backend.processor else None)
        self.stop_tokens = tuple(backend.config.eos_token_id)
        self.grammars = (
            Grammars(self.tokenizer, backend.config.text.vocab_size, self.stop_tokens[0])
            if self.tokenizer is not None
            else None
        )
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[int, _Running] = {}  # slot -> request
        self._cond = threading.Condition()
        self._stopping = False
        self._pool = None  # the backend's Slots object this engine opened
        self.metrics = Metrics()
        self._thread = threading.Thread(target=self._loop, name="slimm-engine", daemon=True)
        self._thread.start()

    # ---- what front ends call ----------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        """Queue a request; QueueFull when max_queue requests already wait, InputError when its prompt
        (and asked-for answer) does not fit a slot."""
        S, cap, want = req.prompt_tokens, self.capacity, req.params.max_tokens
        if S >= cap or (want is not None and S + want > cap):
            asked = (
                f" + {want} answer tokens (max_tokens)" if want is not None else " + at least 1 answer token"
            )
            raise InputError(
                f"the prompt has {S} tokens{asked}, more than the {cap} positions this server's context holds"
            )
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._waiting)} requests are already waiting (--max-queue {self.max_queue})"
                )
            req.submitted = time.monotonic()
            self._waiting.append(req)
            self._cond.notify()
        return req

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"waiting": len(self._waiting), "running": len(self._running), "max_batch": self.max_batch}

    def stop(self, timeout: float = 10.0) -> None:
        """Fail what waits or runs (503), free the backend, end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # ---- the loop ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        held = False
        try:
            while True:
                with self._cond:
                    while not (self._waiting or self._running or self._stopping):
                        if held:  # idle: let generate() and other users of the backend run
                            self.backend.lock.release()
                            held = False
                        self._cond.wait()
                    if self._stopping:
                        break
                if not held:
                    self.backend.lock.acquire()
                    held = True
                    if (
                        self._pool is None or self.backend.slots is not self._pool
                    ):  # someone else used the backend meanwhile
                        self.backend.open_slots(self.max_batch, self.capacity)
                        self._pool = self.backend.slots
                self._admit()
                self._drop_cancelled()
                if self._running:
                    self._step()
        except Exception:  # noqa: BLE001 - the loop must not die silently: fail everything, say why
            log.exception("the engine loop failed")
            self._fail_all(500, "internal error: the engine stopped")
        finally:
            self._fail_all(503, "the server is shutting down")
            if held:
                self.backend.lock.release()

    def _fail_all(self, status: int, message: str) -> None:
        with self._cond:
            self._stopping = True
            pending = list(self._waiting) + [r.req for r in self._running.values()]
            self._waiting.clear()
            self._running.clear()
        for req in pending:
            self._finish(req, Failed(status, message))

    def _admit(self) -> None:
        """Waiting requests into free slots (lowest first, so decode steps cover few rows)."""
        while True:
            with self._cond:
                free = [s for s in range(self.max_batch) if s not in self._running]
                if not free or not self._waiting:
                    return
                req = self._waiting.popleft()
            if req.cancelled.is_set():
                self._finish(req, Finished("cancelled", req.prompt_tokens, 0))
                continue
            slot = free[0]
            try:
                run = _Running(req, self)
                t0 = time.monotonic()
                logits = self.backend.prefill_slot(slot, req.inputs)
            except Exception as e:  # noqa: BLE001 - one request's failure must not stop the others
                self._fail(req, e)
                continue
            with self.metrics.lock:
                self.metrics.prefill_seconds += time.monotonic() - t0
            with self._cond:
                self._running[slot] = run
            self._take(slot, run, logits[None])

    def _drop_cancelled(self) -> None:
        for slot, run in list(self._running.items()):
            if run.req.cancelled.is_set():
                self._leave(slot, Finished("cancelled", run.req.prompt_tokens, run.generated))

    def _step(self) -> None:
        slots = sorted(self._running)
        tokens = np.array([self._running[s].last for s in slots], np.int64)
        t0 = time.monotonic()
        try:
            logits = self.backend.decode_slots(slots, tokens)
        except Exception:  # noqa: BLE001 - find which slot fails, and let the others go on
            logits = None
        with self.metrics.lock:
            m = self.metrics
            m.decode_steps += 1
            m.decode_tokens += len(slots) if logits is not None else 0
            m.decode_seconds += time.monotonic() - t0
        if logits is None:
            for slot, tok in zip(slots, tokens, strict=True):
                try:
                    row = self.backend.decode_slots([slot], tok[None])
                except Exception as e:  # noqa: BLE001
                    run = self._running[slot]
                    self._leave(slot, None)
                    self._fail(run.req, e)
                    continue
                self._take(slot, self._running[slot], row)
            return
        for i, slot in enumerate(slots):
            self._take(slot, self._running[slot], logits[i : i + 1])

    def _take(self, slot: int, run: _Running, logits: np.ndarray) -> None:
        """Sample the request's next token from its logits (1, V); emit it; let it leave when done."""
        try:
            raw = logits.astype(np.float32, copy=False)
            x = raw
            for p in run.procs:
                x = p(run.history, x)
            if run.constraint is not None:
                x = run.constraint.apply(x)
            tok = int(run.sampler(x)[0])
            if run.constraint is not None and tok not in run.stop_tokens:
                run.constraint.accept(tok)
        except Exception as e:  # noqa: BLE001
            self._leave(slot, None)
            self._fail(run.req, e)
            return
        run.history = np.concatenate([run.history, [[tok]]], axis=1)
        now = time.monotonic()
        with self.metrics.lock:
            m = self.metrics
            m.generation_tokens += 1
            if run.generated == 0:
                m.prompt_tokens += run.req.prompt_tokens
                m.ttft.observe(now - run.req.submitted)
            else:
                m.itl.observe(now - run.last_time)
        run.last_time = now
        run.generated += 1
        run.last = tok
        p = run.req.params
        info = []
        if p.logprobs:
            info.append(self._token_info(tok, raw[0], p.top_logprobs))
        reason = "stop" if tok in run.stop_tokens else self._push_text(run, tok)
        if reason is None and run.constraint is not None and run.constraint.complete:
            reason = "stop"  # the JSON value is closed: only the end could follow
        if reason is None and run.generated >= run.limit:
            reason = "length"
        # text that may be the start of a stop string waits until the next tokens tell
        held = 0 if reason else max((_held_back(run.text, s) for s in p.stop), default=0)
        end = len(run.text) - held
        piece, run.sent = run.text[run.sent : end], max(run.sent, end)
        if piece or info:
            run.req.emit(Delta(piece, info))
        if reason is not None:
            self._leave(slot, Finished(reason, run.req.prompt_tokens, run.generated))

    def _push_text(self, run: _Running, tok: int) -> str | None:
        """Append the token's text; "stop" (and the text cut before it) when a stop string appears."""
        if run.decoder is None:
            return None
        start = max(0, len(run.text) - max((len(s) for s in run.req.params.stop), default=0))
        run.text += run.decoder.push(tok)
        for s in run.req.params.stop:
            at = run.text.find(s, start)
            if at >= 0:
                run.text = run.text[:at]
                run.sent = min(run.sent, at)
                return "stop"
        return None

    def _token_info(self, tok: int, raw: np.ndarray, top: int) -> TokenInfo:
        # log-probabilities of the model's own distribution (before temperature and the filters)
        x = raw.astype(np.float64)
        logp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
        best = np.argsort(-logp)[:top] if top else []
        return TokenInfo(
            tok,
            self._piece(tok),
            float(logp[tok]),
            [(int(t), self._piece(int(t)), float(logp[t])) for t in best],
        )

    def _piece(self, tok: int) -> str:
        return self.tokenizer.decode([tok], skip_special_tokens=False) if self.tokenizer else str(tok)

    def _leave(self, slot: int, event: Event | None) -> None:
        with self._cond:
            run = self._running.pop(slot)
        self.backend.free_slot(slot)
        if event is not None:
            self._finish(run.req, event)

    def _fail(self, req: Request, e: Exception) -> None:
        if isinstance(e, SliMMError):  # a bad input found late (an image the model cannot take...)
            self._finish(req, Failed(400, str(e)))
            return
        log.error("request %d failed", req.id, exc_info=e)
        self._finish(req, Failed(500, f"internal error ({type(e).__name__}); the server goes on"))

    def _finish(self, req: Request, event: Event) -> None:
        with self.metrics.lock:
            self.metrics.finished[event.reason if isinstance(event, Finished) else "error"] += 1
        try:
            req.emit(event)
        except Exception:  # noqa: BLE001 - a client's closed channel must not stop the engine
            log.debug("request %d: its event could not be delivered", req.id)
        req.done.set()


def _held_back(text: str, stop: str) -> int:
    """How many trailing characters of `text` could start `stop`: not sent until that is known."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


def wait_idle(engine: Engine, timeout: float = 30.0) -> bool:
    """True once nothing waits or runs (tests use it to see slots freed)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = engine.stats()
        if not s["waiting"] and not s["running"]:
            return True
        time.sleep(0.01)
    return False
