"""Running `widemoe serve`: the server's state, loading the model behind a live uvicorn, and a programmatic
runner for tests and `widemoe eval`.

uvicorn listens at once; the model, tokenizer, chat template and engine load in a background thread, and
`/health` answers 503 until they are ready (as llama.cpp's server does), so a client or a supervisor can
tell "loading" from "down". The socket is bound before uvicorn starts, so a port in use is an `OSError`
for the caller, and `port=0` picks a free port whose number is known at once.

    with serve_in_thread("micro", max_num_seqs=8) as url:       # or serve_in_thread((model, tokenizer))
        OpenAI(base_url=f"{url}/v1", api_key="none").completions.create(...)

On exit the engine shuts down first (running sequences end, their streams close), then uvicorn.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import uvicorn

from widemoe.config import ConfigError
from widemoe.data.tokenizer import ModelTokenizer
from widemoe.hf.resolve import ResolvedModel, load_model, resolve_model
from widemoe.serve.app import ServerState, create_app
from widemoe.serve.engine import Engine
from widemoe.serve.model_files import ChatTemplate, eos_token_ids, model_directory
from widemoe.serve.responses import TokenStrings

log = logging.getLogger("widemoe.serve")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
GRACEFUL_SHUTDOWN_S = 5  # open streams get this long to end once the engine has stopped
# What can be served: a model spec (anything `resolve_model` takes), a resolved one, or a loaded pair.
ModelSource = str | Path | ResolvedModel | tuple[torch.nn.Module, ModelTokenizer]


class ServeError(ConfigError):
    """A serve option that cannot work with this model (a usage error: exit status 2)."""

    exit_status = 2


@dataclass(frozen=True)
class ServeOptions:
    """How to load and bound the engine (the `widemoe serve` flags)."""

    max_num_seqs: int = 16
    max_queue: int = 64
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    chat_template: Path | None = None  # a jinja file instead of the model's own template
    dtype: str = "fp32"
    seed: int = 0  # the random weights of a preset or config (no checkpoint)
    model_dir: Path | None = None  # with a loaded (model, tokenizer): where its template and EOS ids live


def default_model_name(source: ModelSource) -> str:
    """The served model name: the MODEL spec's basename (a preset's name, a run directory's name)."""
    if isinstance(source, tuple):
        return "widemoe"
    spec = source.spec if isinstance(source, ResolvedModel) else str(source)
    return Path(spec.rstrip("/")).name or spec


def context_length(requested: int | None, positions: int) -> int:
    """`--max-model-len`: the model's position count by default, never more."""
    if requested is None:
        return positions
    if requested < 1 or requested > positions:
        raise ServeError(f"--max-model-len={requested} must be in [1, {positions}] "
                         f"(the model's max_position_embeddings)")
    return requested


def load_into(state: ServerState, source: ModelSource, opts: ServeOptions) -> None:
    """Load what `source` names, start the engine, and mark `state` ready."""
    if isinstance(source, tuple):
        model, tokenizer = source
        directory = opts.model_dir
    else:
        resolved = source if isinstance(source, ResolvedModel) else resolve_model(source)
        torch.manual_seed(opts.seed)
        model, tokenizer = load_model(resolved, dtype=DTYPES[opts.dtype], seed=opts.seed)
        directory = model_directory(resolved)
    config = model.config
    max_model_len = context_length(opts.max_model_len, config.max_position_embeddings)
    eos_ids = eos_token_ids(directory, config.eos_token_id)
    template = ChatTemplate.for_model(directory, template_file=opts.chat_template)
    engine = Engine(model, tokenizer, eos_ids=eos_ids, max_model_len=max_model_len,
                    max_num_seqs=opts.max_num_seqs, max_queue=opts.max_queue)
    engine.start()
    state.engine, state.tokenizer, state.template = engine, tokenizer, template
    state.strings, state.eos_ids, state.max_model_len = TokenStrings(tokenizer), eos_ids, max_model_len
    state.ready = True


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (IPv4 or IPv6, as the host resolves)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:  # "address already in use: 127.0.0.1:8000" rather than a bare errno
        sock.close()
        raise OSError(e.errno, e.strerror, f"{host}:{port}") from None
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn whose exit (Ctrl-C, SIGTERM) first stops the engine, so open streams end promptly."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self.interrupted = False  # Ctrl-C stopped it: `widemoe serve` then exits 130 like every command

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.interrupted = self.interrupted or sig == signal.SIGINT
        self._on_exit()
        super().handle_exit(sig, frame)


class Server:
    """The app over `state` served by uvicorn on a socket bound now; the model loads with `load`."""

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int = 0) -> None:
        self.state = state
        self.sock = bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(create_app(state), log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        self.uvicorn = _Uvicorn(config, self.stop_engine)
        self.load_failure: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def load(self, source: ModelSource, opts: ServeOptions) -> threading.Thread:
        """Load in a background thread; a failure is kept in `load_failure` and stops the server."""

        def work() -> None:
            try:
                load_into(self.state, source, opts)
                log.info("serving %s at %s (max_model_len %d, max_num_seqs %d, max_queue %d)",
                         self.state.model_name, self.url, self.state.max_model_len, opts.max_num_seqs,
                         opts.max_queue)
            except BaseException as e:  # noqa: BLE001 - reported by run()/serve_in_thread, not lost in a thread
                self.load_failure = e
                self.state.load_error = f"{type(e).__name__}: {e}"
                log.error("loading %s failed: %s", self.state.model_name, self.state.load_error)
                self.uvicorn.should_exit = True

        thread = threading.Thread(target=work, name="widemoe-load", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        """Serve until told to stop (Ctrl-C in the main thread, `stop` from another)."""
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self.stop_engine()
            self.sock.close()

    def stop_engine(self) -> None:
        if self.state.engine is not None:
            self.state.engine.shutdown()

    def stop(self) -> None:
        self.stop_engine()
        self.uvicorn.should_exit = True


def wait_healthy(server: Server, thread: threading.Thread, timeout_s: float = 60.0) -> None:
    """Return once GET /health answers 200; raise if uvicorn died or the deadline passed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError(f"the server at {server.url} stopped before it was healthy")
        if server.uvicorn.started:
            try:  # no proxy from the environment for a loopback check
                with NO_PROXY.open(f"{server.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except urllib.error.URLError:
                pass
        time.sleep(0.01)
    raise TimeoutError(f"{server.url}/health did not answer 200 within {timeout_s:g} s")


@contextmanager
def serve_in_thread(
    model: ModelSource,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    served_model_name: str | None = None,
    **options: Any,
) -> Iterator[str]:
    """Serve `model` (a spec, a ResolvedModel, or a loaded (model, tokenizer)) from a thread; yield the
    base URL ("http://127.0.0.1:PORT") once the model is loaded and /health is 200. `options` are
    `ServeOptions` fields (max_num_seqs, max_queue, max_model_len, chat_template, dtype, seed, model_dir).
    On exit the engine and uvicorn stop."""
    opts = ServeOptions(**options)
    if opts.dtype not in DTYPES:
        raise ServeError(f"dtype={opts.dtype!r} must be one of {', '.join(DTYPES)}")
    server = Server(ServerState(served_model_name or default_model_name(model)), host, port)
    thread = threading.Thread(target=server.run, name="widemoe-uvicorn", daemon=True)
    thread.start()
    try:
        server.load(model, opts).join()
        if server.load_failure is not None:
            raise server.load_failure
        wait_healthy(server, thread)
        yield server.url
    finally:
        server.stop()
        thread.join(timeout=GRACEFUL_SHUTDOWN_S + 5)


__all__ = ["DTYPES", "ModelSource", "ServeError", "ServeOptions", "Server", "ServerState", "bind",
           "context_length", "default_model_name", "load_into", "serve_in_thread"]
