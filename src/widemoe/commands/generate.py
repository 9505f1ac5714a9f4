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

# The library does the work (`widemoe.hf.resolve`, `widemoe.generate`); its errors reach `widemoe.cli`
# as exceptions and become `error: ...` messages there.
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


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
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed and random-init seed")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from widemoe.generate import GenerationConfig, generate
    from widemoe.hf.resolve import load_model, resolve_model

    torch.manual_seed(args.seed)
    resolved = resolve_model(args.model)
    model, tok = load_model(resolved, dtype=getattr(torch, DTYPES[args.dtype]), seed=args.seed)
    prompts = [tok.encode(p) for p in args.prompt]
    gen = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    t0 = time.perf_counter()
    outs = generate(model, prompts, gen)
    dt = time.perf_counter() - t0
    print(f"# {resolved.description}", file=sys.stderr)
    for prompt, new in zip(args.prompt, outs):
        print(prompt + tok.decode(new))
    n = sum(len(o) for o in outs)
    print(f"# {n} new tokens in {dt:.2f} s ({n / max(dt, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0
