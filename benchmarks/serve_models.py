"""Checkpoints for the serving benchmark (`benchmarks/serve.py`): two random-weight bf16 Hugging Face
directories that widemoe, vLLM's CPU build and `transformers serve` all load.

- `qwen3moe`: Qwen3-MoE, 4 layers, 32 experts top-6 (width 128), hidden 256, GQA 4 query / 2 KV heads of
  64, vocab 4096: 15.50M parameters (issue 13's "15.5M Qwen3-MoE").
- `deepseekv3`: the `tiny` preset (DeepSeek-V3 style: one dense layer then 3 MoE layers of 32 experts
  top-6 plus a shared one, sigmoid router with groups) with MLA widened to kv_lora_rank 512 and
  qk_rope_head_dim 64, the only MLA shape vLLM's CPU MLA kernel accepts, and no MTP module: 13.94M.

Both use a byte-level BPE of 4096 tokens trained on the Austen train split (widemoe's demo tokenizer),
EOS `<|endoftext|>` = id 0, no BOS. Speed does not depend on trained weights, so weights are seeded
random; the routers' selection bias is randomised as well so routing is not degenerate. The directories
are built once under the cache dir (keyed by name; delete it to rebuild) and never committed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from widemoe.config import ModelConfig
from widemoe.data.corpora import Corpus, prose_documents
from widemoe.data.tokenizer import train_tokenizer
from widemoe.hf.saver import save_pretrained
from widemoe.model.causal_lm import build_model
from widemoe.presets import get_preset

VOCAB = 4096
MODELS = ("qwen3moe", "deepseekv3")


def model_config(name: str) -> ModelConfig:
    """The ModelConfig of one benchmark checkpoint (see the module docstring)."""
    if name == "qwen3moe":
        return get_preset(
            "qwen3-30b-a3b", vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, intermediate_size=768,
            moe_intermediate_size=128, n_routed_experts=32, num_experts_per_tok=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, bos_token_id=None,
            eos_token_id=0,
        )
    if name == "deepseekv3":
        return get_preset("tiny", vocab_size=VOCAB, kv_lora_rank=512, qk_rope_head_dim=64,
                          num_nextn_predict_layers=0)
    raise ValueError(f"model {name!r} is not one of {', '.join(MODELS)}")


def _tokenizer_config(path: Path) -> None:
    """tokenizer_config.json as the three servers want it: EOS named, no BOS added, a chat template so
    every server's chat route works too (the benchmark itself only uses /v1/completions)."""
    conf_path = path / "tokenizer_config.json"
    conf = json.loads(conf_path.read_text())
    conf.update(add_bos_token=False, add_eos_token=False, pad_token="<|pad|>")
    conf.setdefault(
        "chat_template",
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}",
    )
    conf_path.write_text(json.dumps(conf, indent=2) + "\n")


def build_checkpoint(name: str, cache: Path, seed: int = 0) -> tuple[Path, int]:
    """The checkpoint directory of ``name`` under ``cache`` (built on first use) and its parameter count."""
    cfg = model_config(name)
    path = cache / "models" / name
    done = path / ".complete"
    if done.is_file():
        return path, int(done.read_text())
    tok = train_tokenizer(Corpus(tuple(prose_documents())), vocab_size=VOCAB, cache_dir=cache)
    model = build_model(cfg, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.moe_blocks():
            bias = getattr(m.gate, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=g) * 0.02)
    n_params = sum(p.numel() for p in model.parameters())
    model = model.to(torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    save_pretrained(model, path, tokenizer=tok.backend)
    _tokenizer_config(path)
    done.write_text(str(n_params))
    return path, n_params


if __name__ == "__main__":
    import sys

    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / ".cache" / "serve"
    for n in MODELS:
        p, count = build_checkpoint(n, root)
        print(f"{n}: {count / 1e6:.2f}M parameters at {p}")
