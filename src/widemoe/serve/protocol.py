"""The OpenAI wire protocol's request checks: a decoded JSON body (or the raw bytes) becomes a checked
`CompletionRequest` / `ChatRequest`, or an `ApiError` carrying the HTTP status and OpenAI's error shape.

Pure Python on purpose: the HTTP layer (FastAPI or not) only decodes, calls `parse_*` and turns an
`ApiError` into `JSONResponse(err.body(), err.status)`, so every rule here is testable without a server.
The status codes are the ones the `openai` client maps to its exception classes (400 BadRequestError,
404 NotFoundError, 413/other 4xx APIStatusError, 429 RateLimitError), so a bad request raises the class a
user expects. Every message is one line naming the parameter, the value and the rule it breaks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 20
MAX_N = 128
DEFAULT_COMPLETION_MAX_TOKENS = 16
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")

# OpenAI's `error.type` per status; the client keys its exception classes on the status alone.
_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class ApiError(ValueError):
    """A request the server refuses, with the HTTP status and the fields of OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


def _show(value: Any, limit: int = 60) -> str:
    """The offending value as JSON, cut short so one huge field cannot flood a log line."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Sampling:
    """The sampling fields completions and chat share."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    include_usage: bool = False


@dataclass(frozen=True)
class CompletionRequest:
    """A checked POST /v1/completions: `prompts` is always a list, each a string or a list of token ids."""

    model: str
    prompts: list[str | list[int]]
    max_tokens: int
    logprobs: int | None
    echo: bool
    sampling: Sampling


@dataclass(frozen=True)
class ChatMessage:
    """One message; list-of-parts content is joined into one string (text parts, newline-separated)."""

    role: str
    content: str
    name: str | None = None


@dataclass(frozen=True)
class ChatRequest:
    """A checked POST /v1/chat/completions. `max_tokens` is None when the client gave no limit: the
    HTTP layer fills it from the context left after rendering the chat template (`check_context`)."""

    model: str
    messages: list[ChatMessage]
    max_tokens: int | None
    logprobs: bool
    top_logprobs: int | None
    sampling: Sampling


# ---- decoding -------------------------------------------------------------------------------------


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def decode_body(body: bytes | dict) -> dict:
    """The request body as a dict: 413 over MAX_BODY_BYTES, 400 when it is not a JSON object."""
    if isinstance(body, dict):
        return body
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"body: {len(body)} bytes is over the limit of {MAX_BODY_BYTES} bytes (8 MiB)")
    try:
        decoded = json.loads(body, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"body: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(decoded, dict):
        raise ApiError(400, f"body: {_show(decoded)} is not a JSON object")
    return decoded


# ---- typed field getters --------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(body: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    """An integer field in [lo, hi]; JSON null means the default."""
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise _bad(name, f"{_show(value)} is not an integer")
    if value < lo or (hi is not None and value > hi):
        rule = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise _bad(name, f"{value} must be {rule}")
    return value


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    """A finite number field in [lo, hi] (or (lo, hi] with lo_open); JSON null means the default."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, f"{_show(value)} is not a number")
    if not math.isfinite(value):
        raise _bad(name, f"{value} is not a finite number")
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if value > hi or value < lo or (lo_open and value == lo):
        raise _bad(name, f"{value} is outside {interval}")
    return float(value)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"{_show(value)} is not a boolean")
    return value


def _stop(body: dict) -> list[str]:
    """`stop`: a string or up to MAX_STOP_STRINGS strings, none empty (an empty one would stop at once)."""
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", f"{_show(value)} is not a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad("stop", f"{len(stops)} stop strings given, at most {MAX_STOP_STRINGS} allowed")
    if any(s == "" for s in stops):
        raise _bad("stop", f"{_show(value)} contains an empty string, stop strings must be non-empty")
    return list(stops)


def _model(body: dict, model_name: str) -> str:
    """`model` must name the served model: absent is 400, another name 404 as OpenAI answers."""
    value = body.get("model")
    if value is None:
        raise _bad("model", f"missing, required (this server serves {_show(model_name)})")
    if not isinstance(value, str):
        raise _bad("model", f"{_show(value)} is not a string")
    if value != model_name:
        raise ApiError(
            404,
            f"model: {_show(value)} does not exist, this server serves {_show(model_name)}",
            param="model",
            code="model_not_found",
        )
    return value


def _sampling(body: dict) -> Sampling:
    """The shared sampling fields, with the rules that tie them together (n > 1 needs sampling,
    stream_options needs stream)."""
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = _int(body, "seed", None, -(2**63), 2**64 - 1)
    n = _int(body, "n", 1, 1, MAX_N)
    if n > 1 and temperature == 0:
        raise _bad("n", f"{n} completions with temperature 0 would be identical, use n=1 or temperature > 0")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("stream_options", f"{_show(options)} given without stream=true")
        if not isinstance(options, dict):
            raise _bad("stream_options", f"{_show(options)} is not an object")
        include_usage = options.get("include_usage") or False
        if not isinstance(include_usage, bool):
            raise _bad("stream_options.include_usage", f"{_show(include_usage)} is not a boolean")
    return Sampling(temperature, top_p, seed, _stop(body), n, stream, include_usage)


# ---- completions ----------------------------------------------------------------------------------


def _prompt_list(value: Any) -> list[str | list[int]]:
    """Normalise the four shapes of `prompt` into a list of prompts (string or token ids)."""
    if isinstance(value, str):
        prompts: list[Any] = [value]
    elif isinstance(value, list) and value and all(_is_int(t) for t in value):
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        prompts = value
    elif isinstance(value, list) and not value:
        raise _bad("prompt", "[] is empty, give at least one prompt")
    else:
        raise _bad("prompt", f"{_show(value)} is not a string, a list of strings, token ids or lists of ids")
    for p in prompts:
        if isinstance(p, list) and not all(_is_int(t) for t in p):
            raise _bad("prompt", f"{_show(p)} is not a list of integer token ids")
        if len(p) == 0:
            raise _bad("prompt", f"{_show(p)} is empty, a prompt needs at least one token")
    return [p if isinstance(p, str) else list(p) for p in prompts]


def _check_token_ids(prompts: list[str | list[int]], vocab_size: int) -> None:
    for p in prompts:
        if isinstance(p, list):
            for t in p:
                if not 0 <= t < vocab_size:
                    raise _bad("prompt", f"token id {t} is outside the vocabulary [0, {vocab_size})")


def check_context(prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """Prompt plus completion must fit the context (`--max-model-len`). Public: the chat endpoint calls it
    once the template is rendered and the prompt's length is known."""
    if prompt_tokens > max_model_len:
        raise _bad("prompt", f"{prompt_tokens} tokens is over the model's context length {max_model_len}")
    if prompt_tokens + max_tokens > max_model_len:
        raise _bad(
            "max_tokens",
            f"{max_tokens} plus the prompt's {prompt_tokens} tokens = {prompt_tokens + max_tokens} "
            f"is over the model's context length {max_model_len}",
        )


def parse_completion(
    body: bytes | dict,
    *,
    model_name: str,
    vocab_size: int,
    max_model_len: int,
    count_tokens: Callable[[str], int] | None = None,
) -> CompletionRequest:
    """Check a POST /v1/completions body. `count_tokens` (the server's tokenizer) lets string prompts be
    checked against the context here; without it only token-id prompts are."""
    data = decode_body(body)
    model = _model(data, model_name)
    if data.get("prompt") is None:
        raise _bad("prompt", "missing, required (a string, a list of strings, token ids or lists of ids)")
    prompts = _prompt_list(data["prompt"])
    _check_token_ids(prompts, vocab_size)
    echo = _bool(data, "echo")
    max_tokens = _int(data, "max_tokens", DEFAULT_COMPLETION_MAX_TOKENS, 0)
    if max_tokens == 0 and not echo:
        raise _bad("max_tokens", "0 is allowed only with echo=true (nothing would be returned)")
    logprobs = _int(data, "logprobs", None, 0, MAX_LOGPROBS)
    sampling = _sampling(data)
    for p in prompts:
        if isinstance(p, list):
            check_context(len(p), max_tokens, max_model_len)
        elif count_tokens is not None:
            check_context(count_tokens(p), max_tokens, max_model_len)
    return CompletionRequest(model, prompts, max_tokens, logprobs, echo, sampling)


# ---- chat -----------------------------------------------------------------------------------------


def _content(value: Any, where: str, role: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts joined by newlines
    (as vLLM joins them). An assistant message may have null content (it carried tool calls)."""
    if isinstance(value, str):
        return value
    if value is None and role == "assistant":
        return ""
    if not isinstance(value, list):
        raise _bad(where, f"{_show(value)} is not a string or a list of content parts")
    texts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _bad(f"{where}[{i}]", f"{_show(part)} is not a text part (type \"text\" and string text)")
        texts.append(part["text"])
    return "\n".join(texts)


def _message(value: Any, i: int) -> ChatMessage:
    where = f"messages[{i}]"
    if not isinstance(value, dict):
        raise _bad(where, f"{_show(value)} is not an object with role and content")
    role = value.get("role")
    if role not in CHAT_ROLES:
        raise _bad(f"{where}.role", f"{_show(role)} is not a known role (one of {', '.join(CHAT_ROLES)})")
    if "content" not in value and role != "assistant":
        raise _bad(f"{where}.content", "missing, required")
    name = value.get("name")
    if name is not None and not isinstance(name, str):
        raise _bad(f"{where}.name", f"{_show(name)} is not a string")
    return ChatMessage(role, _content(value.get("content"), f"{where}.content", role), name)


def parse_chat(
    body: bytes | dict,
    *,
    model_name: str,
    vocab_size: int,
    max_model_len: int,
    count_tokens: Callable[[str], int] | None = None,
) -> ChatRequest:
    """Check a POST /v1/chat/completions body. The prompt is only known after the chat template runs, so
    the context check is the caller's (`check_context`); `vocab_size` and `count_tokens` are accepted so
    both parsers take the same arguments."""
    del vocab_size, count_tokens
    data = decode_body(body)
    model = _model(data, model_name)
    messages = data.get("messages")
    if messages is None:
        raise _bad("messages", "missing, required (a non-empty list of {role, content})")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", f"{_show(messages)} is not a non-empty list of messages")
    checked = [_message(m, i) for i, m in enumerate(messages)]
    name = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(data, name, None, 1)
    if max_tokens is not None and max_tokens >= max_model_len:
        raise _bad(name, f"{max_tokens} leaves no room for a prompt in the context length {max_model_len}")
    logprobs = _bool(data, "logprobs")
    top_logprobs = _int(data, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise _bad("top_logprobs", f"{top_logprobs} given without logprobs=true")
    return ChatRequest(model, checked, max_tokens, logprobs, top_logprobs, _sampling(data))
