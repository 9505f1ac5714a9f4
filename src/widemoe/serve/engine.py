"""The serving engine: one thread owns the model and the caches and runs continuous batching.

Each iteration of the engine thread:

1. ends sequences whose client cancelled (`Handle.cancel`, e.g. a closed connection) and drops the rows
   of finished ones;
2. admits waiting sequences while fewer than ``max_num_seqs`` run: their prompts are prefilled
   together and each samples its first token;
3. runs one decode step over every running sequence (one forward for all rows, `widemoe.serve.batch`)
   and samples each row with its own seeded generator (`widemoe.serve.sampling`).

Every new token goes through the sequence's `TextStream` (whole characters only, stop strings held back
and cut) and reaches the HTTP side as a `SeqOutput` through the sink given to `submit`; the sink runs on
the engine thread and must only hand the output over (e.g. ``loop.call_soon_threadsafe``).

A sequence ends on an EOS id (unless ``ignore_eos``; the EOS token is counted, its text is not
emitted), on a stop string, after ``max_tokens``, or at ``max_model_len``. The waiting queue is bounded:
`submit` raises `QueueFull` (HTTP 429) instead of queueing without end, and `EngineClosed` (HTTP 503)
once the engine is shut down. An exception inside a step ends the sequences of that step with
``finish_reason="error"`` and the engine goes on with an empty batch: a bad request cannot stop it.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from widemoe.data.tokenizer import ModelTokenizer
from widemoe.serve.batch import batch_for
from widemoe.serve.detok import TextStream
from widemoe.serve.sampling import TokenLogprob, logprob_entry, sample_next

log = logging.getLogger("widemoe.serve")


@dataclass(frozen=True)
class SeqParams:
    """One sequence to generate (a request with n choices or several prompts submits several)."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a random seed
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # k >= 0: each new token's logprob and its k most likely alternatives
    prompt_logprobs: bool = False  # echo: the prompt tokens' logprobs too (the first is None)
    ignore_eos: bool = False


@dataclass
class SeqOutput:
    """What one engine step produced for a sequence; the last one has `finish_reason` set."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob | None] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    ttft_s: float | None = None
    elapsed_s: float | None = None


class QueueFull(Exception):
    """The waiting queue cannot take the request now (HTTP 429)."""


class EngineClosed(Exception):
    """The engine is not running (HTTP 503)."""


@dataclass
class EngineStats:
    active: int
    waiting: int
    max_batch: int
    tokens_generated: int
    requests_finished: int


class Handle:
    """The sequences of one `submit`; `cancel` ends them at the engine's next step."""

    def __init__(self, engine: Engine, seqs: list[_Seq]) -> None:
        self._engine, self._seqs = engine, seqs

    def cancel(self) -> None:
        for s in self._seqs:
            s.cancelled = True
        self._engine._wake()


@dataclass(eq=False)
class _Seq:
    params: SeqParams
    index: int
    sink: Callable[[int, SeqOutput], None]
    stream: TextStream
    rng: torch.Generator
    arrival: float
    tokens: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    pending_prompt_logprobs: list[TokenLogprob | None] | None = None
    cancelled: bool = False
    done: bool = False


class Engine:
    """Continuous batching over one model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer: ModelTokenizer, *, eos_ids: Sequence[int],
                 max_model_len: int, max_num_seqs: int = 16, max_queue: int = 64) -> None:
        for name, value in (("max_num_seqs", max_num_seqs), ("max_queue", max_queue),
                            ("max_model_len", max_model_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Engine: {name}={value!r} must be an integer >= 1")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.vocab_size = model.config.vocab_size
        self.eos_ids = frozenset(eos_ids)
        self.max_model_len, self.max_num_seqs, self.max_queue = max_model_len, max_num_seqs, max_queue
        self._batch = batch_for(model)
        self._running: list[_Seq] = []  # in the batch's row order
        self._waiting: deque[_Seq] = deque()
        self._cond = threading.Condition()
        self._closed = True
        self._thread: threading.Thread | None = None
        self._stats = EngineStats(0, 0, 0, 0, 0)

    # ---- the HTTP side ----------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._closed = False
        self._thread = threading.Thread(target=self._loop, name="widemoe-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread; sequences still waiting or running end with ``finish_reason="abort"``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def submit(self, params: Sequence[SeqParams], sink: Callable[[int, SeqOutput], None]) -> Handle:
        """Queue the sequences of one request (all or none). ``sink(i, output)`` receives sequence i's
        outputs in order, called on the engine thread."""
        now = time.perf_counter()
        seqs = []
        for i, p in enumerate(params):
            rng = torch.Generator()
            rng.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
            seqs.append(_Seq(p, i, sink, TextStream(self.tokenizer.decode, p.stop), rng, now))
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is not running")
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} sequences are waiting (--max-queue {self.max_queue})")
            self._waiting.extend(seqs)
            self._cond.notify_all()
        return Handle(self, seqs)

    def stats(self) -> EngineStats:
        with self._cond:
            s = self._stats
            return EngineStats(len(self._running), len(self._waiting), s.max_batch, s.tokens_generated,
                               s.requests_finished)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---- the engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not self._waiting and not self._running:
                        self._cond.wait()
                    if self._closed:
                        break
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001 - any failure ends this step's sequences, not the engine
                    log.exception("engine step failed")
                    self._fail_running(f"{type(e).__name__}: {e}")
        self._abort_all()

    def _step(self) -> None:
        self._retire()
        admitted = self._take_waiting()
        if admitted:
            self._prefill(admitted)
            self._retire()
        if self._running:
            with self._cond:
                self._stats.max_batch = max(self._stats.max_batch, len(self._running))
            logits = self._batch.decode([s.tokens[-1] for s in self._running])
            for s, row in zip(self._running, logits):
                self._accept(s, row)

    def _take_waiting(self) -> list[_Seq]:
        taken = []
        with self._cond:
            while self._waiting and len(self._running) + len(taken) < self.max_num_seqs:
                s = self._waiting.popleft()
                if s.cancelled:
                    self._finish(s, "abort")
                else:
                    taken.append(s)
            for s in [s for s in self._waiting if s.cancelled]:  # a cancelled request leaves the queue now
                self._waiting.remove(s)
                self._finish(s, "abort")
        return taken

    def _prefill(self, seqs: list[_Seq]) -> None:
        self._running.extend(seqs)  # rows in the batch's order, before the forward: a failure ends them too
        want_prompt = any(s.params.prompt_logprobs for s in seqs)
        last, full = self._batch.prefill([s.params.prompt for s in seqs], all_positions=want_prompt)
        for j, s in enumerate(seqs):
            if s.params.prompt_logprobs and full is not None:
                s.pending_prompt_logprobs = self._prompt_logprobs(s, full[j])
            if s.params.max_tokens == 0:  # echo only: the prompt is scored, nothing is generated
                self._finish(s, "length")
            else:
                self._accept(s, last[j])

    def _prompt_logprobs(self, s: _Seq, logits_LV: torch.Tensor) -> list[TokenLogprob | None]:
        k = s.params.logprobs or 0
        lp_LV = torch.log_softmax(logits_LV[:-1], dim=-1)
        prompt = s.params.prompt
        return [None] + [logprob_entry(lp_LV[t], prompt[t + 1], k) for t in range(len(prompt) - 1)]

    def _accept(self, s: _Seq, logits_V: torch.Tensor) -> None:
        """Sample the sequence's next token from its logits, emit it, and end the sequence if it is done."""
        if s.cancelled:
            self._finish(s, "abort")
            return
        p = s.params
        token = sample_next(logits_V, p.temperature, p.top_p, s.rng)
        entry = [logprob_entry(torch.log_softmax(logits_V, -1), token, p.logprobs)] \
            if p.logprobs is not None else []
        s.tokens.append(token)
        if s.first_token_at is None:
            s.first_token_at = time.perf_counter()
        with self._cond:
            self._stats.tokens_generated += 1
        eos = token in self.eos_ids and not p.ignore_eos
        text = "" if eos else s.stream.push(token)
        if eos or s.stream.stopped:
            reason = "stop"
        elif len(s.tokens) >= p.max_tokens or len(p.prompt) + len(s.tokens) >= self.max_model_len:
            reason = "length"
        else:
            self._deliver(s, SeqOutput(text, [token], entry, self._take_prompt_logprobs(s), None,
                                       len(p.prompt), len(s.tokens)))
            return
        self._finish(s, reason, text, [token], entry)

    @staticmethod
    def _take_prompt_logprobs(s: _Seq) -> list[TokenLogprob | None] | None:
        out, s.pending_prompt_logprobs = s.pending_prompt_logprobs, None
        return out

    def _finish(self, s: _Seq, reason: str, text: str = "", token_ids: list[int] | None = None,
                entry: list[TokenLogprob] | None = None, error: str | None = None) -> None:
        if s.done:
            return
        s.done = True
        text += s.stream.finish() if reason in ("stop", "length") else ""
        now = time.perf_counter()
        ttft = None if s.first_token_at is None else s.first_token_at - s.arrival
        out = SeqOutput(text, token_ids or [], entry or [], self._take_prompt_logprobs(s), reason,
                        len(s.params.prompt), len(s.tokens), error, ttft, now - s.arrival)
        with self._cond:
            self._stats.requests_finished += 1
        self._deliver(s, out)

    def _deliver(self, s: _Seq, out: SeqOutput) -> None:
        try:
            s.sink(s.index, out)
        except Exception:  # noqa: BLE001 - a broken sink ends its own sequence only
            log.exception("output sink failed; cancelling the sequence")
            s.cancelled = True

    def _retire(self) -> None:
        """Drop finished and cancelled sequences from the batch."""
        for s in self._running:
            if s.cancelled and not s.done:
                self._finish(s, "abort")
        keep = [r for r, s in enumerate(self._running) if not s.done]
        if len(keep) != len(self._running):
            self._batch.keep(keep)
            with self._cond:
                self._running = [self._running[r] for r in keep]

    def _fail_running(self, message: str) -> None:
        for s in self._running:
            self._finish(s, "error", error=message)
        with self._cond:
            self._running = []
        self._batch = batch_for(self.model)

    def _abort_all(self) -> None:
        with self._cond:
            seqs = self._running + list(self._waiting)
            self._running, self._waiting = [], deque()
        for s in seqs:
            self._finish(s, "abort")


__all__ = ["Engine", "EngineClosed", "EngineStats", "Handle", "QueueFull", "SeqOutput", "SeqParams",
           "TokenLogprob"]
