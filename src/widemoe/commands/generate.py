"""`widemoe generate MODEL PROMPT`: continue text with a preset, a config file or a checkpoint directory.

MODEL may be a preset name or a widemoe config file (a randomly initialised model: the output is
noise, which is useful for checking the machinery and speed), a Hugging Face model directory
(loaded strictly through `widemoe.hf`), or a training run directory (its newest committed
checkpoint). A directory's own `tokenizer.json` is used when present; otherwise prompts are encoded
as UTF-8 bytes (ids 0-255), which needs `vocab_size >= 256`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

# The library does the work (`widemoe.hf.resolve`, `widemoe.generate`); its errors reach `widemoe.cli`
# as exceptions and become `error: ...` messages there.
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def sampling_flag(name: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse `type=` for a sampling parameter: parsed, then checked by the library's one rule
    (`widemoe.generate.check_parameter`), so a bad value is a usage error naming the rule."""

    def convert(text: str) -> Any:
        from widemoe.generate import check_parameter  # torch loads only when the flag is given

        try:
            return check_parameter(name, parse(text))
        except ValueError as e:
            message = str(e) if name in str(e) else f"invalid {parse.__name__} value: {text!r}"
            raise argparse.ArgumentTypeError(message) from None

    convert.__name__ = parse.__name__  # argparse names the type in its own messages
    return convert


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt with a model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model", help="preset name, config file (.json/.toml), model directory or training run directory"
    )
    p.add_argument("prompt", nargs="+", help="prompt text (several prompts run as one batch)")
    p.add_argument("--max-new-tokens", type=sampling_flag("max_new_tokens", int), default=32,
                   help="at most this many new tokens (default 32); never past the model's positions")
    p.add_argument("--temperature", type=sampling_flag("temperature", float), default=0.0,
                   help="0 = greedy (default)")
    p.add_argument("--top-k", type=sampling_flag("top_k", int), default=None, help=">= 1 (default: off)")
    p.add_argument("--top-p", type=sampling_flag("top_p", float), default=None, help="in (0, 1], default off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed and random-init seed")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from widemoe.generate import GenerationConfig, check_prompts, generate, position_budget
    from widemoe.hf.resolve import load_model, resolve_model

    torch.manual_seed(args.seed)
    resolved = resolve_model(args.model)
    model, tok = load_model(resolved, dtype=getattr(torch, DTYPES[args.dtype]), seed=args.seed)
    prompts = [tok.encode(p) for p in args.prompt]
    check_prompts(model, prompts)  # before anything is printed
    gen = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    print(f"# {resolved.description}", file=sys.stderr)
    t0 = time.perf_counter()
    if len(prompts) == 1:  # one prompt: print its text as it comes
        outs = [stream_one(model, tok, args.prompt[0], prompts[0], gen, sys.stdout)]
    else:
        outs = generate(model, prompts, gen)
        for prompt, new in zip(args.prompt, outs):
            print(prompt + tok.decode(new))
    dt = time.perf_counter() - t0
    steps, limited = position_budget(model, prompts, gen)
    if limited and max(len(o) for o in outs) == steps:
        positions = model.config.max_position_embeddings
        print(f"# stopped at the model's position limit ({positions} positions)", file=sys.stderr)
    n = sum(len(o) for o in outs)
    print(f"# {n} new tokens in {dt:.2f} s ({n / max(dt, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0


def stream_one(model: Any, tok: Any, text: str, ids: list[int], gen: Any, out: TextIO) -> list[int]:
    """Write `text`, then each new piece of the continuation as it is decoded, flushing each time."""
    from widemoe.generate import stream

    out.write(text)
    out.flush()
    new: list[int] = []
    shown = ""
    try:
        for step in stream(model, [ids], gen):
            if step[0] is None:
                break
            new.append(step[0])
            decoded = tok.decode(new)
            # a piece ending in U+FFFD may be half a UTF-8 character: wait for the next token
            if decoded.startswith(shown) and not decoded.endswith("\ufffd"):
                out.write(decoded[len(shown) :])
                out.flush()
                shown = decoded
    finally:  # also on Ctrl-C: what was generated, and the line ended
        decoded = tok.decode(new)
        out.write((decoded[len(shown) :] if decoded.startswith(shown) else "") + "\n")
        out.flush()
    return new
