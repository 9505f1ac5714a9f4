"""DeepSeek-V4 training: the lightning indexer's own objective, the balanced hash table, the SwiGLU clamp."""

from __future__ import annotations

import pytest
import torch

from test_v4_parity import CSA, SW, make_ids, tiny_v4_config
from widemoe.model.causal_lm import WideMoeForCausalLM
from widemoe.model.deepseek_v4 import balanced_tid2eid
from widemoe.model.layers import SwiGLU


def _indexer_params(m: WideMoeForCausalLM) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in m.named_parameters() if ".indexer." in n}


def test_indexer_gets_gradient_only_from_its_objective() -> None:
    c = tiny_v4_config(index_topk=3, index_loss_coef=1.0, layer_types=[SW, CSA], num_hash_layers=1)
    torch.manual_seed(0)
    m = WideMoeForCausalLM(c).train()
    ids = make_ids(c, 2, 33)
    out = m(ids[:, :-1], labels=ids[:, 1:])
    assert "index_kl" in out.aux_losses
    # the LM loss alone reaches no indexer parameter (top-k selection has no gradient) ...
    out.lm_loss.backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in _indexer_params(m).values())
    m.zero_grad(set_to_none=True)
    # ... the indexer objective reaches every one of them and nothing else (detached inputs)
    out.aux_losses["index_kl"].backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None and p.grad.any()}
    assert set(grads) == set(_indexer_params(m))


def test_indexer_objective_off_by_default() -> None:
    c = tiny_v4_config(index_topk=3, layer_types=[SW, CSA], num_hash_layers=1)
    m = WideMoeForCausalLM(c).train()
    ids = make_ids(c, 1, 20)
    assert "index_kl" not in m(ids[:, :-1], labels=ids[:, 1:]).aux_losses


def test_indexer_recall_rises_during_training() -> None:
    c = tiny_v4_config(index_topk=64, index_loss_coef=1.0, layer_types=[SW, CSA], num_hash_layers=1)
    torch.manual_seed(0)
    m = WideMoeForCausalLM(c).train()
    attn = m.model.layers[1].self_attn
    ids = make_ids(c, 2, 49)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    recalls = []
    for _ in range(12):
        out = m(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        recalls.append(attn.last_index_recall)
    # (the KL itself is not monotone: its target, the main attention, sharpens as the LM trains)
    assert recalls[-1] > recalls[0] + 0.08, recalls


def test_balanced_tid2eid() -> None:
    t = balanced_tid2eid(1000, 16, 4)
    assert t.shape == (1000, 4) and t.dtype == torch.int64
    assert torch.equal(t, balanced_tid2eid(1000, 16, 4))  # deterministic
    assert all(len(set(row.tolist())) == 4 for row in t)  # K distinct experts per token
    load = torch.bincount(t.flatten(), minlength=16)
    assert int(load.max() - load.min()) <= 1  # every expert serves floor or ceil of V*K/E ids
    m = WideMoeForCausalLM(tiny_v4_config(num_hash_layers=2))
    assert torch.equal(m.model.layers[1].mlp.gate.tid2eid, balanced_tid2eid(256, 8, 2))


def test_shared_expert_swiglu_clamp() -> None:
    torch.manual_seed(0)
    mlp = SwiGLU(8, 16, limit=0.05)
    x = torch.randn(5, 8) * 10
    g, u = mlp.gate_proj(x), mlp.up_proj(x)
    want = mlp.down_proj(torch.nn.functional.silu(g.clamp(max=0.05)) * u.clamp(-0.05, 0.05))
    assert torch.allclose(mlp(x), want)
    free = mlp.down_proj(torch.nn.functional.silu(g) * u)
    assert not torch.allclose(mlp(x), free)


def test_mtp_block_trains() -> None:
    c = tiny_v4_config(layer_types=[SW, CSA], num_hash_layers=1, num_nextn_predict_layers=1)
    torch.manual_seed(0)
    m = WideMoeForCausalLM(c).train()
    ids = make_ids(c, 2, 25)
    out = m(ids[:, :-1], labels=ids[:, 1:])
    assert out.mtp_loss is not None and len(out.routing) == 3  # two layers + the MTP block
    out.loss.backward()
    mtp = m.model.mtp[0]
    for p in (mtp.e_proj.weight, mtp.h_proj.weight, mtp.hc_head.hc_fn, mtp.block.attn_hc.fn,
              mtp.block.self_attn.q_a_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_hash_layer_needs_token_ids() -> None:
    c = tiny_v4_config(num_hash_layers=1)
    gate = WideMoeForCausalLM(c).model.layers[0].mlp.gate
    with pytest.raises(ValueError, match="token ids"):
        gate(torch.randn(3, c.hidden_size))
