"""DeepSeek-V4 forward parity with transformers 5.24 `DeepseekV4ForCausalLM` on tiny random fp32 models.

Every parameter transformers initialises to a constant (sinks, compressor position biases, mHC bases
and scales, the selection bias, the hash table) is randomised first, so each of them is exercised.
Lengths cross several CSA/HCA windows and the sliding window. Also the helpers the other V4 tests use.
"""

from __future__ import annotations

import pytest
import torch

from widemoe.config import ModelConfig
from widemoe.model.causal_lm import WideMoeForCausalLM

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

SW, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
LAYERS = [SW, CSA, HCA, CSA, HCA]


def tiny_v4_config(index_topk: int = 64, layer_types: list[str] | None = None, num_hash_layers: int = 2,
                   **over: object) -> ModelConfig:
    lt = tuple(layer_types or LAYERS)
    d = dict(model_type="deepseek_v4", vocab_size=256, hidden_size=64, intermediate_size=32,
             moe_intermediate_size=32, num_hidden_layers=len(lt), num_attention_heads=4,
             num_key_value_heads=1, head_dim=32, q_lora_rank=32, qk_rope_head_dim=8, n_routed_experts=8,
             num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1, scoring_func="sqrtsoftplus",
             topk_method="noaux_tc", routed_scaling_factor=1.5, max_position_embeddings=512, rope_theta=1e4,
             compress_rope_theta=1.6e5,
             rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                           "beta_fast": 32, "beta_slow": 1},
             layer_types=lt, compress_rate_csa=4, compress_rate_hca=8, num_hash_layers=num_hash_layers,
             hc_mult=4, hc_sinkhorn_iters=20, sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=2,
             index_head_dim=16, index_topk=index_topk, swiglu_limit=10.0, num_nextn_predict_layers=0,
             bos_token_id=0, eos_token_id=1)
    d.update(over)
    return ModelConfig(**d)


def hf_config(c: ModelConfig) -> DeepseekV4Config:
    rs = c.rope_scaling
    return DeepseekV4Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, moe_intermediate_size=c.moe_intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=1, head_dim=c.head_dim, q_lora_rank=c.q_lora_rank,
        partial_rotary_factor=c.qk_rope_head_dim / c.head_dim,
        n_routed_experts=c.n_routed_experts, num_experts_per_tok=c.num_experts_per_tok, n_shared_experts=1,
        routed_scaling_factor=c.routed_scaling_factor, max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta, compress_rope_theta=c.compress_rope_theta,
        rope_parameters={"rope_type": "yarn", "factor": rs["factor"],
                         "original_max_position_embeddings": rs["original_max_position_embeddings"],
                         "beta_fast": rs["beta_fast"], "beta_slow": rs["beta_slow"]},
        layer_types=list(c.v4_layer_types),
        compress_rates={CSA: c.compress_rate_csa, HCA: c.compress_rate_hca},
        mlp_layer_types=["hash_moe" if i < c.num_hash_layers else "moe" for i in range(c.num_hidden_layers)],
        hc_mult=c.hc_mult, hc_sinkhorn_iters=c.hc_sinkhorn_iters, sliding_window=c.sliding_window,
        o_groups=c.o_groups, o_lora_rank=c.o_lora_rank, index_n_heads=c.index_n_heads,
        index_head_dim=c.index_head_dim, index_topk=c.index_topk, swiglu_limit=c.swiglu_limit,
        num_nextn_predict_layers=0, rms_norm_eps=c.rms_norm_eps, bos_token_id=0, eos_token_id=1)


@torch.no_grad()
def randomise_v4(model: torch.nn.Module, num_experts: int, seed: int = 0) -> None:
    """Give every constant-initialised V4 tensor random values (transformers' or widemoe's model)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("sinks", "position_bias", "base", "hc_base"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        elif leaf in ("scale", "hc_scale"):
            p.copy_(1.0 + torch.rand(p.shape, generator=g))
        elif "norm" in name and p.dim() == 1:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    for name, b in sorted(model.named_buffers()):
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)
        elif name.endswith("tid2eid"):
            rows = [torch.randperm(num_experts, generator=g)[: b.shape[1]] for _ in range(b.shape[0])]
            b.copy_(torch.stack(rows))


def hf_pair(c: ModelConfig, seed: int = 0) -> tuple[DeepseekV4ForCausalLM, WideMoeForCausalLM]:
    """A randomised transformers V4 model and the widemoe model loaded from its state_dict (strict)."""
    torch.manual_seed(seed)
    hf = DeepseekV4ForCausalLM(hf_config(c)).eval()
    randomise_v4(hf, c.n_routed_experts, seed)
    wm = WideMoeForCausalLM(c).eval()
    sd = {k: v for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    missing, unexpected = wm.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all("tokens_per_expert" in k for k in missing), missing
    return hf, wm


def make_ids(c: ModelConfig, B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, c.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_chosen_experts(hf: DeepseekV4ForCausalLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """Sorted expert ids per token and layer, recorded from transformers' routers."""
    got: list[torch.Tensor] = []

    def hook(mod, args, out):  # noqa: ANN001, ANN202
        got.append(out[2].reshape(-1, out[2].shape[-1]).sort(-1).values)

    hs = [layer.mlp.gate.register_forward_hook(hook) for layer in hf.model.layers]
    try:
        hf(input_ids=ids)
    finally:
        for h in hs:
            h.remove()
    return got


@pytest.mark.parametrize("index_topk,T", [(64, 45), (3, 45)])
def test_logits_and_experts_match_transformers(index_topk: int, T: int) -> None:
    # T=45 crosses 11 CSA windows (rate 4), 5 HCA windows (rate 8) and the 8-token sliding window;
    # index_topk=3 < the 11 entries exercises the indexer's selection (ties are ReLU zeros, which
    # both implementations score identically and break alike).
    c = tiny_v4_config(index_topk=index_topk)
    hf, wm = hf_pair(c)
    ids = make_ids(c, 2, T)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        out = wm(ids)
    assert (out.logits - ref).abs().max().item() < 1e-5
    hf_ids = hf_chosen_experts(hf, ids)
    assert len(out.routing) == len(hf_ids) == c.num_hidden_layers
    for info, ref_ids in zip(out.routing, hf_ids, strict=True):
        assert torch.equal(info.topk_ids.sort(-1).values, ref_ids)


def test_hash_layers_follow_tid2eid() -> None:
    c = tiny_v4_config()
    _, wm = hf_pair(c)
    ids = make_ids(c, 1, 20)
    with torch.no_grad():
        out = wm(ids)
    for i in range(c.num_hash_layers):
        table = wm.model.layers[i].mlp.gate.tid2eid
        assert torch.equal(out.routing[i].topk_ids, table[ids.reshape(-1)])


def test_indexer_selection_changes_logits() -> None:
    # Guards the test above: with a small index_topk the indexer must actually matter.
    full, sparse = tiny_v4_config(index_topk=64), tiny_v4_config(index_topk=2)
    _, wm_full = hf_pair(full)
    _, wm_sparse = hf_pair(sparse)
    ids = make_ids(full, 1, 45)
    with torch.no_grad():
        d = (wm_full(ids).logits - wm_sparse(ids).logits).abs().max().item()
    assert d > 1e-4


def test_hf_default_schedule_and_sliding_only_model() -> None:
    c = tiny_v4_config(layer_types=[SW, SW], num_hash_layers=1)
    hf, wm = hf_pair(c)
    ids = make_ids(c, 1, 20)
    with torch.no_grad():
        assert (wm(ids).logits - hf(input_ids=ids).logits).abs().max().item() < 1e-5
    d = tiny_v4_config().replace(layer_types=(), num_hidden_layers=4)
    assert d.v4_layer_types == (HCA, HCA, HCA, CSA)


def test_swiglu_clamp_matches_transformers_when_it_binds() -> None:
    # Experts and shared expert weights x40: their gate/up activations exceed swiglu_limit=10, so the
    # clamp decides the output (routed experts and shared expert alike).
    c = tiny_v4_config(index_topk=64)
    hf, wm = hf_pair(c)
    with torch.no_grad():
        for model in (hf, wm):
            for layer in model.model.layers:
                layer.mlp.experts.gate_up_proj.mul_(40)
                layer.mlp.shared_experts.gate_proj.weight.mul_(40)
                layer.mlp.shared_experts.up_proj.weight.mul_(40)
        ids = make_ids(c, 2, 30)
        ref, out = hf(input_ids=ids).logits, wm(ids).logits
        tol = 1e-4 * ref.abs().max().item()
        for layer in wm.model.layers:  # guard: without the clamps the logits differ
            layer.mlp.experts.swiglu_limit = layer.mlp.shared_experts.limit = None
        unclamped = wm(ids).logits
        for layer in wm.model.layers:
            layer.mlp.experts.swiglu_limit = layer.mlp.shared_experts.limit = c.swiglu_limit
    out_train = wm.train()(ids).logits  # the autograd dispatch clamps too
    wm.eval()
    assert (out - ref).abs().max().item() < tol
    assert (out_train.detach() - ref).abs().max().item() < tol
    assert (unclamped - ref).abs().max().item() > 100 * tol
