"""The HTTP side of `widemoe serve`: a FastAPI app speaking OpenAI's wire format over the engine.

Endpoints: `GET /health` (503 while the model loads), `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions`, vLLM's `POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info`
(lm-eval tokenizes with the server's own tokenizer through them), and `GET /metrics` (the engine's
counters, JSON or Prometheus text). The app validates (`serve.protocol`), tokenizes, submits to the
engine and streams; it never touches tensors (shared/DESIGN.md: the server is an engine plus a protocol).

Every error is OpenAI's `{"error": {...}}` with the status the `openai` client maps to its exception
classes: FastAPI's own 422 for a validation error and Starlette's 404/405 are rewritten, a body over
8 MiB is refused as it arrives (413), a full queue is 429 with `Retry-After`, a model still loading or
an engine shut down is 503, anything else 500; none of them reaches the engine thread.

The engine calls a request's sink from its own thread; the sink only hands each output to the event
loop (`call_soon_threadsafe`), where the request's coroutine reads them from an asyncio queue. A client
that goes away cancels its sequences: a stream's generator is cancelled by Starlette, a non-streamed
request watches for `http.disconnect` while it waits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from widemoe.data.tokenizer import ModelTokenizer
from widemoe.serve import responses as R
from widemoe.serve.engine import Engine, EngineClosed, QueueFull, SeqOutput, SeqParams
from widemoe.serve.model_files import ChatTemplate, TemplateError
from widemoe.serve.protocol import (
    MAX_BODY_BYTES,
    ApiError,
    ChatRequest,
    check_context,
    decode_body,
    parse_chat,
    parse_completion,
)

log = logging.getLogger("widemoe.serve")
RETRY_AFTER_S = 1  # what a 429 asks the client to wait; the openai client honours Retry-After


@dataclass
class ServerState:
    """What the app serves from. `ready` turns True once the model, tokenizer, template and engine are
    set (they load in a background thread while uvicorn already answers); `load_error` says why they
    never will."""

    model_name: str
    max_model_len: int | None = None
    created: int = field(default_factory=R.now)
    engine: Engine | None = None
    tokenizer: ModelTokenizer | None = None
    strings: R.TokenStrings | None = None
    template: ChatTemplate | None = None
    eos_ids: list[int] = field(default_factory=list)
    ready: bool = False
    load_error: str | None = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tok = self.tokenizer
        assert tok is not None
        if tok.backend is None or add_special_tokens:
            return tok.encode(text)
        return tok.backend.encode(text, add_special_tokens=False).ids


# ---- plumbing: errors, bodies, the engine bridge ------------------------------------------------------


def _error(e: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _api(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Run an endpoint, turning every failure into OpenAI's error shape (and one log line)."""

    async def endpoint(request: Request) -> Response:
        where = f"{request.method} {request.url.path}"
        try:
            return await fn(request)
        except ApiError as e:
            log.info("%s -> %d: %s", where, e.status, e.message)
            return _error(e)
        except TemplateError as e:
            log.info("%s -> 400: %s", where, e)
            return _error(ApiError(400, f"messages: {e}", param="messages"))
        except QueueFull as e:
            log.info("%s -> 429: %s", where, e)
            message = f"the server is busy ({e}); retry after {RETRY_AFTER_S} s"
            return _error(ApiError(429, message, code="queue_full"), {"Retry-After": str(RETRY_AFTER_S)})
        except EngineClosed as e:
            log.info("%s -> 503: %s", where, e)
            return _error(ApiError(503, f"the engine is not running ({e})"))
        except ClientDisconnect:  # gone while sending the body: nobody to answer
            log.info("%s -> 499: the client closed the connection", where)
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - a bug answers 500, it must not take the server down
            log.exception("%s -> 500", where)
            return _error(ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    endpoint.__name__ = fn.__name__
    endpoint.__doc__ = fn.__doc__
    return endpoint


def _state(request: Request) -> ServerState:
    """The server state once the model is ready; 503 (OpenAI's shape) before."""
    state: ServerState = request.app.state.server
    if state.load_error is not None:
        raise ApiError(503, f"the model failed to load: {state.load_error}")
    if not state.ready:
        raise ApiError(503, f"the model {state.model_name!r} is still loading; retry when /health is 200")
    return state


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 once it is known to be over 8 MiB: from Content-Length before
    reading, and while reading for a body sent without one (chunked)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"body: {declared} bytes is over the limit of {MAX_BODY_BYTES} bytes (8 MiB)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"body: more than {MAX_BODY_BYTES} bytes (8 MiB), over the limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request) -> dict:
    return decode_body(await read_body(request))


class Submission:
    """One `Engine.submit`: the outputs of its sequences, in arrival order, as an async iterator of
    (sequence index, SeqOutput). The engine thread only enqueues them on this request's event loop.
    Without an engine (echo of the prompt alone) each sequence is finished at once."""

    def __init__(self, engine: Engine | None, params: list[SeqParams]) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, SeqOutput]] = asyncio.Queue()

        def sink(i: int, out: SeqOutput) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (i, out))
            except RuntimeError:  # the loop is closed: the server is gone and nobody waits
                pass

        self.open = len(params)
        self.handle = None if engine is None else engine.submit(params, sink)
        if engine is None:
            for i, p in enumerate(params):
                done = SeqOutput("", [], [], None, "length", len(p.prompt), 0, None, 0.0, 0.0)
                self.queue.put_nowait((i, done))

    async def __aiter__(self) -> AsyncIterator[tuple[int, SeqOutput]]:
        while self.open:
            i, out = await self.queue.get()
            if out.finish_reason is not None:
                self.open -= 1
            yield i, out

    def cancel(self) -> None:
        if self.open and self.handle is not None:
            self.handle.cancel()


async def _disconnected(request: Request) -> None:
    """Return when the client hangs up (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(sub: Submission, request: Request, n: int) -> list[list[SeqOutput]]:
    """Every output of every sequence; the client going away first cancels them (logged as 499)."""
    outs: list[list[SeqOutput]] = [[] for _ in range(n)]

    async def gather() -> None:
        async for i, out in sub:
            outs[i].append(out)

    work = asyncio.ensure_future(gather())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise ApiError(499, "the client closed the connection before the response was ready")
        work.result()
        return outs
    finally:
        gone.cancel()
        work.cancel()
        sub.cancel()


def check_finished(out: SeqOutput) -> None:
    """A sequence that ended in the engine's failure or shutdown answers 500/503, not a partial text."""
    if out.finish_reason == "error":
        raise ApiError(500, f"generation failed: {out.error}")
    if out.finish_reason == "abort":
        raise ApiError(503, "the server shut down before the request finished")


def stream_error(out: SeqOutput) -> str:
    """A mid-stream failure as OpenAI sends it (`data: {"error": ...}`; the client raises APIError)."""
    message = f"generation failed: {out.error}" if out.finish_reason == "error" else "the server shut down"
    return R.sse(ApiError(500 if out.finish_reason == "error" else 503, message).body())


class EventStream(StreamingResponse):
    """An SSE response that cancels its sequences however it ends: finished, failed, or the client gone
    before the first byte (when Starlette never starts the generator, its `finally` cannot run)."""

    def __init__(self, content: AsyncIterator[str], sub: Submission) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.sub = sub

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.sub.cancel()


def log_request(rid: str, prompt_tokens: int, finals: list[SeqOutput]) -> None:
    """The request's one log line: its id, token counts, time to first token and decode speed."""
    completion = sum(o.completion_tokens for o in finals)
    ttfts = [o.ttft_s for o in finals if o.ttft_s is not None]
    elapsed = max((o.elapsed_s or 0.0 for o in finals), default=0.0)
    ttft = f"{min(ttfts):.3f} s" if ttfts else "-"
    reasons = ",".join(sorted({str(o.finish_reason) for o in finals}))
    log.info("%s: %d prompt + %d completion tokens, ttft %s, %.1f tokens/s, %s", rid, prompt_tokens,
             completion, ttft, completion / elapsed if elapsed > 0 else 0.0, reasons)


def raw_flag(data: dict, name: str) -> bool:
    """A boolean vLLM extension read from the raw body (`ignore_eos`)."""
    value = data.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name}: {json.dumps(value)[:60]} is not a boolean", param=name)
    return value




def _check_model(data: dict, state: ServerState) -> None:
    """An optional `model` (tokenize, detokenize) must still name the served model."""
    value = data.get("model")
    if value is not None and value != state.model_name:
        raise ApiError(404, f"model: {json.dumps(value)[:60]} does not exist, this server serves "
                            f"{json.dumps(state.model_name)}", param="model", code="model_not_found")


async def _respond(request: Request, job: R.CompletionJob | R.ChatJob, sub: Submission, n: int,
                   stream: bool, include_usage: bool) -> Response:
    """Stream the job's events, or wait for every sequence and answer the whole response."""
    if stream:
        return EventStream(_events(job, sub, include_usage), sub)
    outs = await collect(sub, request, n)
    for seq in outs:
        check_finished(seq[-1])
    log_request(job.rid, job.prompt_tokens, [seq[-1] for seq in outs])
    return JSONResponse(job.body(outs))


async def _events(job: R.CompletionJob | R.ChatJob, sub: Submission, usage: bool) -> AsyncIterator[str]:
    """SSE events for every output, the usage chunk when asked, then `[DONE]`."""
    finals: list[SeqOutput] = []
    async for i, out in sub:
        if out.finish_reason in ("error", "abort"):
            log.info("%s: %s", job.rid, out.error or "aborted")
            yield stream_error(out)
            yield R.SSE_DONE
            return
        for event in job.chunks(i, out):
            yield R.sse(event)
        if out.finish_reason is not None:
            finals.append(out)
    if usage:
        yield R.sse(job.event([], R.usage(job.prompt_tokens, sum(o.completion_tokens for o in finals))))
    log_request(job.rid, job.prompt_tokens, finals)
    yield R.SSE_DONE


async def completions(request: Request) -> Response:
    """POST /v1/completions: one sequence per prompt and choice (choice index = prompt_i * n + j)."""
    state = _state(request)
    assert state.engine is not None and state.tokenizer is not None and state.max_model_len is not None
    data = await read_json(request)
    encoded: dict[str, list[int]] = {}

    def count(text: str) -> int:  # tokenizes each string prompt once, for the check and the submit
        return len(encoded.setdefault(text, state.encode(text)))

    req = parse_completion(data, model_name=state.model_name, vocab_size=state.engine.vocab_size,
                           max_model_len=state.max_model_len, count_tokens=count)
    ignore_eos = raw_flag(data, "ignore_eos")
    prompts = [p if isinstance(p, list) else encoded.get(p) or state.encode(p) for p in req.prompts]
    if any(not p for p in prompts):
        raise ApiError(400, "prompt: a prompt tokenizes to no tokens", param="prompt")
    texts = [p if isinstance(p, str) else state.tokenizer.decode(p) for p in req.prompts]
    s = req.sampling
    params = [
        SeqParams(prompt=ids, max_tokens=req.max_tokens, temperature=s.temperature, top_p=s.top_p,
                  seed=R.choice_seed(s.seed, j), stop=tuple(s.stop), logprobs=req.logprobs,
                  prompt_logprobs=req.echo and req.logprobs is not None, ignore_eos=ignore_eos)
        for ids in prompts for j in range(s.n)
    ]
    job = R.CompletionJob(R.new_id("cmpl"), state.model_name, _strings(state), prompts, texts, s.n, req.echo,
                          req.logprobs)
    # echo with max_tokens=0 and no logprobs asks for nothing the engine computes
    skip = req.max_tokens == 0 and req.logprobs is None
    sub = Submission(None if skip else state.engine, params)
    return await _respond(request, job, sub, len(params), s.stream, s.include_usage)


def _strings(state: ServerState) -> R.TokenStrings:
    assert state.strings is not None
    return state.strings


def _chat_prompt(state: ServerState, req: ChatRequest) -> tuple[list[int], int]:
    """The rendered, tokenized prompt (no special tokens added: the template wrote them) and the
    completion's token limit (the context left when the client gave none)."""
    assert state.template is not None and state.max_model_len is not None
    text = state.template.render(req.messages, add_generation_prompt=True)
    prompt = state.encode(text, add_special_tokens=False)
    limit = state.max_model_len
    if not prompt:
        raise ApiError(400, "messages: the chat template rendered them to an empty prompt", param="messages")
    if req.max_tokens is not None:
        check_context(len(prompt), req.max_tokens, limit)
        return prompt, req.max_tokens
    if len(prompt) >= limit:
        raise ApiError(400, f"messages: the rendered prompt's {len(prompt)} tokens leave no room for a "
                            f"completion in the context length {limit}", param="messages")
    return prompt, limit - len(prompt)


async def chat_completions(request: Request) -> Response:
    """POST /v1/chat/completions: the messages rendered with the chat template, n choices."""
    state = _state(request)
    assert state.engine is not None and state.max_model_len is not None
    data = await read_json(request)
    req = parse_chat(data, model_name=state.model_name, vocab_size=state.engine.vocab_size,
                     max_model_len=state.max_model_len)
    ignore_eos = raw_flag(data, "ignore_eos")
    prompt, max_tokens = _chat_prompt(state, req)
    s = req.sampling
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = [
        SeqParams(prompt=prompt, max_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p,
                  seed=R.choice_seed(s.seed, j), stop=tuple(s.stop), logprobs=k, ignore_eos=ignore_eos)
        for j in range(s.n)
    ]
    job = R.ChatJob(R.new_id("chatcmpl"), state.model_name, _strings(state), len(prompt), req.logprobs)
    sub = Submission(state.engine, params)
    return await _respond(request, job, sub, len(params), s.stream, s.include_usage)


async def tokenize(request: Request) -> Response:
    """POST /tokenize (vLLM's): `{prompt, add_special_tokens=true}` or `{messages, add_generation_prompt=
    true, add_special_tokens=false}` -> `{count, max_model_len, tokens}`."""
    state = _state(request)
    assert state.engine is not None and state.template is not None
    data = await read_json(request)
    _check_model(data, state)
    if data.get("messages") is not None:
        req = parse_chat({**data, "model": state.model_name}, model_name=state.model_name,
                         vocab_size=state.engine.vocab_size, max_model_len=state.max_model_len or 1)
        add_generation = _bool_field(data, "add_generation_prompt", True)
        text = state.template.render(req.messages, add_generation_prompt=add_generation)
        tokens = state.encode(text, add_special_tokens=_bool_field(data, "add_special_tokens", False))
    else:
        prompt = data.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError(400, f"prompt: {json.dumps(prompt)[:60]} is not a string (or give messages)",
                           param="prompt")
        tokens = state.encode(prompt, add_special_tokens=_bool_field(data, "add_special_tokens", True))
    return JSONResponse({"count": len(tokens), "max_model_len": state.max_model_len, "tokens": tokens,
                         "token_strs": None})


def _bool_field(data: dict, name: str, default: bool) -> bool:
    return default if data.get(name) is None else raw_flag(data, name)


async def detokenize(request: Request) -> Response:
    """POST /detokenize (vLLM's): `{tokens}` -> `{prompt}`."""
    state = _state(request)
    assert state.engine is not None and state.tokenizer is not None
    data = await read_json(request)
    _check_model(data, state)
    tokens = data.get("tokens")
    vocab = state.engine.vocab_size
    ok = isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)
    if not ok:
        raise ApiError(400, f"tokens: {json.dumps(tokens)[:60]} is not a list of token ids", param="tokens")
    bad = next((t for t in tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"tokens: token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
    return JSONResponse({"prompt": state.tokenizer.decode(tokens)})


async def tokenizer_info(request: Request) -> Response:
    """GET /tokenizer_info (vLLM's shape; lm-eval reads eos_token and tokenizes it with /tokenize)."""
    state = _state(request)
    assert state.tokenizer is not None and state.template is not None
    special = state.template.special_tokens
    eos = special.get("eos_token") or R.eos_token_text(_strings(state), state.eos_ids)
    return JSONResponse({
        "tokenizer_class": "ByteTokenizer" if state.tokenizer.is_bytes else "PreTrainedTokenizerFast",
        "eos_token": eos, "bos_token": special.get("bos_token"), "pad_token": special.get("pad_token"),
        "unk_token": special.get("unk_token"), "model_max_length": state.max_model_len,
        "vocab_size": state.tokenizer.vocab_size, "chat_template": state.template.text,
    })


async def health(request: Request) -> Response:
    """GET /health: 200 once the model serves, 503 (OpenAI's error shape) while it loads."""
    _state(request)
    return JSONResponse({"status": "ok"})


async def models(request: Request) -> Response:
    """GET /v1/models: the one served model."""
    state = _state(request)
    return JSONResponse(R.models_list(state.model_name, state.created, state.max_model_len or 0))


async def metrics(request: Request) -> Response:
    """GET /metrics: the engine's counters, JSON, or Prometheus text with ?format=prometheus or an Accept
    header asking for text/plain."""
    state = _state(request)
    assert state.engine is not None
    stats = dataclasses.asdict(state.engine.stats())
    wants_text = "text/plain" in request.headers.get("accept", "")
    if request.query_params.get("format") == "prometheus" or wants_text:
        return PlainTextResponse(R.prometheus(stats), media_type="text/plain; version=0.0.4")
    return JSONResponse(stats)


ROUTES: list[tuple[str, str, Callable[[Request], Awaitable[Response]]]] = [
    ("GET", "/health", health),
    ("GET", "/v1/models", models),
    ("POST", "/v1/completions", completions),
    ("POST", "/v1/chat/completions", chat_completions),
    ("POST", "/tokenize", tokenize),
    ("POST", "/detokenize", detokenize),
    ("GET", "/tokenizer_info", tokenizer_info),
    ("GET", "/metrics", metrics),
]


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app over `state` (filled in by `serve.server` once the model has loaded)."""
    app = FastAPI(title="widemoe", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        if e.status_code == 404:
            message = f"{where}: no such endpoint"
        elif e.status_code == 405:
            message = f"{where}: method not allowed (allowed: {(e.headers or {}).get('Allow', '?')})"
        else:
            message = f"{where}: {e.detail}"
        log.info("%s -> %d", where, e.status_code)
        return _error(ApiError(e.status_code, message), dict(e.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error(ApiError(400, f"invalid request: {e.errors()}"))

    for method, path, handler in ROUTES:
        app.add_api_route(path, _api(handler), methods=[method])
    return app


__all__ = ["ROUTES", "ServerState", "create_app"]
