"""Tiny models and an engine driver shared by the serving tests (no HTTP: the engine directly)."""

from __future__ import annotations

import threading
import time

import torch

from widemoe.config import ModelConfig
from widemoe.data.tokenizer import ModelTokenizer
from widemoe.model.causal_lm import build_model
from widemoe.presets import get_preset
from widemoe.serve.engine import Engine, SeqOutput, SeqParams


def v3_micro() -> ModelConfig:
    """DeepSeek-V3 in miniature: MLA (absorbed latent cache when decoding), sigmoid routing, MTP."""
    return get_preset("micro")


def gqa_micro() -> ModelConfig:
    """A Qwen3-MoE-style GQA family with head qk-norm."""
    return ModelConfig(model_type="qwen3_moe", vocab_size=256, hidden_size=64, num_hidden_layers=2,
                       intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                       num_experts_per_tok=2,
                       scoring_func="softmax", topk_method="greedy", norm_topk_prob=True,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, qk_norm="head",
                       rope_interleave=False, max_position_embeddings=128, eos_token_id=1)


def v4_micro() -> ModelConfig:
    """DeepSeek-V4 in miniature: sliding window, CSA and HCA compressed layers, hash routing."""
    lt = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
    return ModelConfig(
        model_type="deepseek_v4", vocab_size=256, hidden_size=64, intermediate_size=32,
        moe_intermediate_size=32,
        num_hidden_layers=len(lt), num_attention_heads=4, num_key_value_heads=1, head_dim=32, q_lora_rank=32,
        qk_rope_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1,
        topk_group=1, scoring_func="sqrtsoftplus", topk_method="noaux_tc", routed_scaling_factor=1.5,
        max_position_embeddings=256, rope_theta=1e4, compress_rope_theta=1.6e5, layer_types=lt,
        compress_rate_csa=4, compress_rate_hca=8, num_hash_layers=1, hc_mult=4, hc_sinkhorn_iters=20,
        sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=16, index_topk=4,
        swiglu_limit=10.0, num_nextn_predict_layers=0, bos_token_id=0, eos_token_id=1)


FAMILIES = {"deepseek_v3": v3_micro, "qwen3_moe": gqa_micro, "deepseek_v4": v4_micro}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    return build_model(FAMILIES[family](), seed=seed).eval()


def byte_tokenizer(model: torch.nn.Module) -> ModelTokenizer:
    return ModelTokenizer(None, model.config.vocab_size, model.config.eos_token_id, 0)


def new_engine(model: torch.nn.Module, **kw: object) -> Engine:
    kw.setdefault("max_model_len", model.config.max_position_embeddings)
    engine = Engine(model, byte_tokenizer(model), eos_ids=kw.pop("eos_ids", []), **kw)
    engine.start()
    return engine


class Collector:
    """A sink that records every output per sequence and signals when all sequences have finished."""

    def __init__(self, n: int) -> None:
        self.outputs: list[list[SeqOutput]] = [[] for _ in range(n)]
        self._left = n
        self._done = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, i: int, out: SeqOutput) -> None:
        with self._lock:
            self.outputs[i].append(out)
            if out.finish_reason is not None:
                self._left -= 1
                if self._left == 0:
                    self._done.set()

    def wait(self, timeout: float = 60.0) -> Collector:
        if not self._done.wait(timeout):
            raise TimeoutError(f"sequences did not finish within {timeout} s")
        return self

    def tokens(self, i: int) -> list[int]:
        return [t for o in self.outputs[i] for t in o.token_ids]

    def text(self, i: int) -> str:
        return "".join(o.text for o in self.outputs[i])

    def final(self, i: int) -> SeqOutput:
        return self.outputs[i][-1]


def run(engine: Engine, params: list[SeqParams], timeout: float = 60.0) -> Collector:
    sink = Collector(len(params))
    engine.submit(params, sink)
    return sink.wait(timeout)


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `predicate` until it holds (no fixed sleeps: returns as soon as it is true)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not hold within {timeout} s")
        time.sleep(0.005)
