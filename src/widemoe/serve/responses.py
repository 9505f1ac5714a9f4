"""OpenAI's response and stream-chunk JSON for completions and chat, built from the engine's outputs.

The shapes follow vLLM's `entrypoints/openai` protocol (shared/reference/serving.md): completions carry
the legacy logprobs `{tokens, token_logprobs, top_logprobs: [{token: lp}], text_offset}` (with `echo` the
first prompt token's entry is null, which lm-eval's loglikelihood skips), chat carries
`logprobs.content[{token, logprob, bytes, top_logprobs}]`. Pure functions over plain data: the HTTP
layer (`serve.app`) decides when to send what.

A token's string in logprobs is its exact bytes decoded as UTF-8; a token that is only part of a
character (a byte-level BPE piece, a byte of the byte fallback) is written as OpenAI writes it,
`bytes:\\xe2\\x82`, so two such tokens never collide as keys of a `top_logprobs` dict.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from tokenizers import decoders

from widemoe.data.tokenizer import BYTE_VOCAB, ModelTokenizer


def new_id(prefix: str) -> str:
    """A response id as OpenAI's: `cmpl-…` / `chatcmpl-…`."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


@lru_cache(maxsize=1)
def _byte_level_decoding() -> dict[str, int]:
    """GPT-2's byte-to-printable-character table, inverted: a ByteLevel token's characters to its bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TokenStrings:
    """Each token id's exact bytes and the string logprobs show for it, cached per id."""

    def __init__(self, tokenizer: ModelTokenizer) -> None:
        self.tokenizer = tokenizer
        backend = tokenizer.backend
        added = {} if backend is None else backend.get_added_tokens_decoder()
        self._added = {i: t.content for i, t in added.items()}
        self._byte_level = backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
        self.bytes = lru_cache(maxsize=1 << 16)(self._bytes)  # type: ignore[method-assign]
        self.text = lru_cache(maxsize=1 << 16)(self._text)  # type: ignore[method-assign]

    def _bytes(self, token_id: int) -> bytes:
        backend = self.tokenizer.backend
        if backend is None:  # the byte fallback: ids 0-255 are the bytes, higher ids decode to nothing
            return bytes([token_id]) if token_id < BYTE_VOCAB else b""
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = backend.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level:
            table = _byte_level_decoding()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return backend.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def _text(self, token_id: int) -> str:
        raw = self.bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def eos_token_text(strings: TokenStrings, eos_ids: Sequence[int]) -> str | None:
    """The EOS token as text that /tokenize turns back into its id (lm-eval reads it that way)."""
    if not eos_ids:
        return None
    raw = strings.bytes(eos_ids[0])
    try:
        return raw.decode("utf-8") if raw else None
    except UnicodeDecodeError:
        return None


def choice_seed(seed: int | None, j: int) -> int | None:
    """Choice j of n samples with seed + j (as vLLM's parallel sampling), wrapped into torch's range."""
    if seed is None or j == 0:
        return seed
    s = seed + j
    return s - 2**64 if s > 2**64 - 1 else s


# ---- logprobs -----------------------------------------------------------------------------------------


def legacy_logprobs(
    strings: TokenStrings, entries: Sequence[tuple[int, Any]], offset: int
) -> tuple[dict[str, list], int]:
    """Completions' logprobs for (token id, TokenLogprob or None) pairs, text offsets from `offset`.

    Each `top_logprobs` dict holds the k alternatives and the chosen token (as vLLM returns them), so
    `max(top.values())` compares the chosen token with the best one (lm-eval's `is_greedy`)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, lp in entries:
        text = strings.text(token_id)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if lp is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        top = {strings.text(t): v for t, v in lp.top}
        top.setdefault(text, lp.logprob)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append(top)
    return out, offset


def chat_logprobs(strings: TokenStrings, entries: Sequence[Any]) -> list[dict[str, Any]]:
    """Chat's `logprobs.content` entries for TokenLogprobs."""
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": strings.text(token_id), "logprob": logprob, "bytes": list(strings.bytes(token_id))}

    return [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]} for e in entries]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# ---- whole responses and stream chunks ----------------------------------------------------------------


def sse(data: Any) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


@dataclass
class CompletionJob:
    """A checked /v1/completions request as submitted: sequence i is choice i, of prompt i // n.

    `body` builds the non-streamed response from every sequence's outputs, `chunk` one stream event's
    choice from one output; both give the same text and logprobs (the stream's pieces join to the body)."""

    rid: str
    model: str
    strings: TokenStrings
    prompts: list[list[int]]
    texts: list[str]  # each prompt as text (echo)
    n: int
    echo: bool
    logprobs: int | None
    created: int = field(default_factory=now)
    _offsets: dict[int, int] = field(default_factory=dict)  # streaming: each choice's next text offset

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def _logprobs(self, i: int, outs: Sequence[Any], first: bool, offset: int) -> tuple[dict | None, int]:
        if self.logprobs is None:
            return None, offset
        entries: list[tuple[int, Any]] = []
        prompt = self.prompts[i // self.n]
        if first and self.echo:
            scored = next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None)
            entries += zip(prompt, scored or [None] * len(prompt))
        entries += [(lp.token_id, lp) for o in outs for lp in o.logprobs]
        return legacy_logprobs(self.strings, entries, offset)

    def _start(self, i: int) -> tuple[str, int]:
        """The text a choice starts with (the prompt with echo) and where its offsets count from."""
        text = self.texts[i // self.n]
        return (text, 0) if self.echo else ("", len(text))

    def body(self, outs: list[list[Any]]) -> dict:
        choices = []
        for i, seq in enumerate(outs):
            head, offset = self._start(i)
            lp, _ = self._logprobs(i, seq, True, offset)
            text = head + "".join(o.text for o in seq)
            choices.append(completion_choice(i, text, lp, seq[-1].finish_reason))
        done = sum(seq[-1].completion_tokens for seq in outs)
        return {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(self.prompt_tokens, done)}

    def chunks(self, i: int, out: Any) -> list[dict]:
        """The event for one output of sequence i (none when it carries nothing to send)."""
        first = i not in self._offsets
        head, offset = self._start(i) if first else ("", self._offsets[i])
        lp, self._offsets[i] = self._logprobs(i, [out], first, offset)
        text = head + out.text
        if not text and lp is None and out.finish_reason is None:
            return []
        return [self.event([completion_choice(i, text, lp, out.finish_reason)])]

    def event(self, choices: list[dict], use: dict | None = None) -> dict:
        chunk = {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                 "choices": choices}
        return chunk if use is None else {**chunk, "usage": use}


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


@dataclass
class ChatJob:
    """A checked /v1/chat/completions request as submitted (n choices of one rendered prompt)."""

    rid: str
    model: str
    strings: TokenStrings
    prompt_tokens: int
    logprobs: bool
    created: int = field(default_factory=now)
    _started: set[int] = field(default_factory=set)

    def _logprobs(self, outs: Sequence[Any]) -> dict | None:
        if not self.logprobs:
            return None
        return {"content": chat_logprobs(self.strings, [lp for o in outs for lp in o.logprobs])}

    def body(self, outs: list[list[Any]]) -> dict:
        choices = [
            {"index": i, "message": {"role": "assistant", "content": "".join(o.text for o in seq)},
             "logprobs": self._logprobs(seq), "finish_reason": seq[-1].finish_reason}
            for i, seq in enumerate(outs)
        ]
        done = sum(seq[-1].completion_tokens for seq in outs)
        return {"id": self.rid, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(self.prompt_tokens, done)}

    def chunks(self, i: int, out: Any) -> list[dict]:
        """The events for one output of choice i: first the role (once), then the content; the last
        content chunk carries the finish reason."""
        events = []
        if i not in self._started:
            self._started.add(i)
            events.append(self.event([chat_delta(i, {"role": "assistant", "content": ""}, None, None)]))
        lp = self._logprobs([out])
        if out.text or out.logprobs or out.finish_reason is not None:
            events.append(self.event([chat_delta(i, {"content": out.text}, lp, out.finish_reason)]))
        return events

    def event(self, choices: list[dict], use: dict | None = None) -> dict:
        chunk = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model, "choices": choices}
        return chunk if use is None else {**chunk, "usage": use}


def chat_delta(index: int, delta: dict, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def models_list(model: str, created: int, max_model_len: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "widemoe", "max_model_len": max_model_len}]}


def prometheus(stats: dict[str, int]) -> str:
    """The engine's counters in Prometheus' text format, one gauge or counter each."""
    kinds = {"active": "gauge", "waiting": "gauge", "max_batch": "gauge"}
    lines = []
    for name, value in stats.items():
        metric = f"widemoe_{name}"
        lines += [f"# TYPE {metric} {kinds.get(name, 'counter')}", f"{metric} {value}"]
    return "\n".join(lines) + "\n"
