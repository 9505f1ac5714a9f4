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
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# Refuse to materialise a random model bigger than this share of the machine's memory.
MAX_MEMORY_SHARE = 0.5


class ByteTokenizer:
    """Prompts as UTF-8 bytes; the fallback when a model comes without a tokenizer."""

    def __init__(self, vocab_size: int):
        if vocab_size < 256:
            raise SystemExit(
                f"error: vocab_size={vocab_size} < 256: a model without a tokenizer.json needs "
                "room for the 256 byte ids"
            )

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class FileTokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def _available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def load_model_and_tokenizer(spec: str, dtype_name: str, seed: int):
    """Resolve MODEL (directory, config file or preset) to (model, tokenizer, description)."""
    import torch

    from widemoe.config import ConfigError, ModelConfig, get_preset
    from widemoe.model.transformer import build_model

    dtype = getattr(torch, DTYPES[dtype_name])
    path = Path(spec)
    if path.is_dir() and not (path / "config.json").exists() and (path / "checkpoints").is_dir():
        from widemoe.train.checkpoint import latest_checkpoint

        latest = latest_checkpoint(path)  # a training run: its newest committed checkpoint
        if latest is None:
            raise SystemExit(f"error: {path} is a run directory without a committed checkpoint yet")
        path = latest
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SystemExit(
                f"error: {path} is a directory without config.json; expected a Hugging Face model "
                "directory (config.json + *.safetensors)"
            )
        from widemoe.hf import load_pretrained

        model = load_pretrained(path, dtype=dtype)
        tok_file = path / "tokenizer.json"
        tok = FileTokenizer(tok_file) if tok_file.exists() else ByteTokenizer(model.config.vocab_size)
        return model, tok, f"checkpoint {path}"
    try:
        config = ModelConfig.from_file(path) if path.suffix in (".json", ".toml") else get_preset(spec)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    meta = build_model(config, device="meta")
    nbytes = meta.num_parameters() * torch.tensor([], dtype=dtype).element_size()
    if nbytes > MAX_MEMORY_SHARE * _available_memory_bytes():
        raise SystemExit(
            f"error: {spec} has {meta.num_parameters() / 1e9:.1f}B parameters "
            f"({nbytes / 2**30:.1f} GiB in {dtype_name}); that does not fit in this machine's memory. "
            "Use a small preset (tiny, micro) or a real checkpoint directory."
        )
    model = build_model(config, dtype=dtype, seed=seed)
    return model, ByteTokenizer(config.vocab_size), f"randomly initialised {spec} (output is noise)"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt with a model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="preset name, widemoe config file (.json/.toml) or model directory")
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

    torch.manual_seed(args.seed)
    model, tok, what = load_model_and_tokenizer(args.model, args.dtype, args.seed)
    prompts = [tok.encode(p) for p in args.prompt]
    eos = model.config.eos_token_id
    gen = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_id=eos,
        pad_token_id=model.config.pad_token_id or 0,
    )
    t0 = time.perf_counter()
    outs = generate(model, prompts, gen)
    dt = time.perf_counter() - t0
    print(f"# {what}", file=sys.stderr)
    for prompt, new in zip(args.prompt, outs):
        print(prompt + tok.decode(new))
    n = sum(len(o) for o in outs)
    print(f"# {n} new tokens in {dt:.2f} s ({n / max(dt, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0
