"""`widemoe serve MODEL`: an OpenAI-compatible HTTP server with continuous batching.

MODEL is anything `widemoe generate` takes: a preset or config file (random weights, for testing the
machinery), a Hugging Face model directory, or a training run directory (its newest checkpoint). The
server listens at once and loads the model in the background: `GET /health` answers 503 until it is
ready. Point the `openai` client (base_url http://HOST:PORT/v1), a chat UI or lm-evaluation-harness's
`local-completions` at it. Endpoints: /v1/models, /v1/completions, /v1/chat/completions, /tokenize,
/detokenize, /tokenizer_info, /metrics, /health. One log line per request on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from widemoe.commands.generate import DTYPES


def _int_at_least(lo: int, flag: str):  # noqa: ANN202 - an argparse type
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{flag}={value} must be >= {lo}")
        return value

    convert.__name__ = "int"
    return convert


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"--port={value} must be in [0, 65535] (0: any free port)")
    return value


def _name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("--served-model-name must not be empty")
    return text


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model", help="preset name, config file (.json/.toml), model directory or training run directory"
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--served-model-name", type=_name, default=None,
                   help="the model name clients send (default: MODEL's basename)")
    p.add_argument("--max-num-seqs", type=_int_at_least(1, "--max-num-seqs"), default=16,
                   help="sequences decoded together at most (default 16)")
    p.add_argument("--max-queue", type=_int_at_least(1, "--max-queue"), default=64,
                   help="sequences waiting at most; more are refused with 429 (default 64)")
    p.add_argument("--max-model-len", type=_int_at_least(1, "--max-model-len"), default=None,
                   help="prompt + completion tokens at most (default and upper bound: the model's positions)")
    p.add_argument("--chat-template", type=Path, default=None, metavar="FILE",
                   help="jinja chat template instead of the model's own")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--seed", type=int, default=0, help="random-init seed of a preset or config (default 0)")
    p.add_argument("--threads", type=_int_at_least(1, "--threads"), default=None,
                   help="torch threads of the engine (default: all cores but one, at least 1; the HTTP side "
                        "needs a core too, and decode steps of small models do not gain from more threads)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from widemoe.hf.resolve import resolve_model
    from widemoe.runtime import configure_cpu_runtime
    from widemoe.serve.app import ServerState
    from widemoe.serve.model_files import ChatTemplate, model_directory
    from widemoe.serve.server import ServeOptions, Server, context_length, default_model_name

    # Everything that can be checked without the weights fails here, before a port is taken.
    resolved = resolve_model(args.model)
    max_model_len = context_length(args.max_model_len, resolved.config.max_position_embeddings)
    ChatTemplate.for_model(model_directory(resolved), template_file=args.chat_template)
    opts = ServeOptions(max_num_seqs=args.max_num_seqs, max_queue=args.max_queue, max_model_len=max_model_len,
                        chat_template=args.chat_template, dtype=args.dtype, seed=args.seed)
    configure_cpu_runtime(args.threads or max(1, (os.cpu_count() or 2) - 1))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name = args.served_model_name or default_model_name(args.model)
    server = Server(ServerState(name, max_model_len=max_model_len), args.host, args.port)
    logging.getLogger("widemoe.serve").info("%s: loading %s; listening at %s (/health is 503 until loaded)",
                                            name, resolved.description, server.url)
    server.load(resolved, opts)
    server.run()
    if server.load_failure is not None:
        raise server.load_failure
    if server.uvicorn.interrupted:  # uvicorn re-raises the SIGINT it handled, but not on every path
        raise KeyboardInterrupt
    return 0
