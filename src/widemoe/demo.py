"""`make demo`: build the `tiny` preset and run one generation (training lands with the demo issue)."""

from __future__ import annotations

import time

import torch

from widemoe.config import get_preset
from widemoe.generate import GenerationConfig, generate
from widemoe.model.transformer import build_model


def main() -> None:
    torch.set_num_threads(2)
    config = get_preset("tiny")
    t0 = time.perf_counter()
    model = build_model(config, seed=0)
    n_total = model.num_parameters()
    print(f"built the tiny preset: {n_total / 1e6:.2f}M parameters, {config.num_hidden_layers} layers, "
          f"{config.n_routed_experts} routed experts (top-{config.num_experts_per_tok}) + "
          f"{config.n_shared_experts} shared, MLA latent {config.kv_lora_rank}, in {time.perf_counter() - t0:.2f} s")
    prompt = list("The experts".encode())
    t0 = time.perf_counter()
    out = generate(model, [prompt], GenerationConfig(max_new_tokens=16, seed=0))
    print(f"one greedy generation of {len(out[0])} tokens from a random model in {time.perf_counter() - t0:.2f} s: "
          f"{out[0]}")


if __name__ == "__main__":
    main()
