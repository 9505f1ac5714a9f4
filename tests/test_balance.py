"""Aux-loss-free bias update, MaxVio / dead-expert metrics, LoadTracker."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from widemoe.model.balance import LoadTracker, dead_experts, max_vio
from widemoe.model.moe import MoE
from widemoe.presets import get_preset
from widemoe.train.bias_update import update_expert_bias


class _TwoBlocks(nn.Module):
    def __init__(self, **overrides) -> None:
        super().__init__()
        cfg = get_preset("micro", n_group=1, topk_group=1, **overrides)
        self.blocks = nn.ModuleList([MoE(cfg, layer_idx=1), MoE(cfg, layer_idx=2)])
        with torch.no_grad():
            for b in self.blocks:
                b.gate.weight.normal_(std=0.3)

    def forward(self, x):
        infos = []
        for b in self.blocks:
            x, info = b(x)
            infos.append(info)
        return x, infos


def test_metrics():
    assert max_vio(torch.tensor([2.0, 2.0, 2.0])) == 0.0
    assert max_vio(torch.tensor([6.0, 0.0, 0.0])) == pytest.approx(2.0)  # 6 / 2 - 1
    assert max_vio(torch.zeros(4)) == 0.0
    assert dead_experts(torch.tensor([3.0, 0.0, 1.0, 0.0])) == 2


def test_overloaded_expert_bias_goes_down_underloaded_goes_up():
    model = _TwoBlocks()
    blk = model.blocks[0]
    with torch.no_grad():
        blk.gate.e_score_correction_bias[2] = 1.0  # expert 2 is chosen by every token: overloaded
    model.train()
    counts = torch.zeros(8)
    for _ in range(3):  # micro-batches accumulate until the update
        _, infos = model(torch.randn(2, 8, 64))
        counts += infos[0].counts
    torch.testing.assert_close(blk.tokens_per_expert, counts)
    bias_before = blk.gate.e_score_correction_bias.clone()
    stats = update_expert_bias(model, speed=0.01)
    delta = blk.gate.e_score_correction_bias - bias_before
    mean = counts.mean()
    assert delta[2] == pytest.approx(-0.01)  # most loaded
    for i in range(8):
        expected = 0.01 * float(torch.sign(mean - counts[i]))
        assert delta[i].item() == pytest.approx(expected)
    under = int(counts.argmin())
    assert delta[under] > 0
    assert stats[1]["max_vio"] == pytest.approx(max_vio(counts))
    assert stats[1]["dead_experts"] == dead_experts(counts)
    assert set(stats) == {1, 2}
    assert blk.tokens_per_expert.sum() == 0 and model.blocks[1].tokens_per_expert.sum() == 0


def test_default_speed_comes_from_config():
    model = _TwoBlocks(bias_update_speed=0.05)
    model.train()
    model(torch.randn(1, 8, 64))
    before = model.blocks[0].gate.e_score_correction_bias.clone()
    update_expert_bias(model)
    delta = (model.blocks[0].gate.e_score_correction_bias - before).abs()
    assert delta.max() == pytest.approx(0.05)
    torch.testing.assert_close(delta[delta > 0], torch.full_like(delta[delta > 0], 0.05))


def test_eval_forwards_leave_counts_and_bias_alone():
    model = _TwoBlocks().eval()
    with torch.no_grad():
        model(torch.randn(2, 8, 64))
    assert model.blocks[0].tokens_per_expert.sum() == 0
    before = model.blocks[0].gate.e_score_correction_bias.clone()
    update_expert_bias(model, speed=0.1)  # nothing counted: nothing changes
    assert torch.equal(model.blocks[0].gate.e_score_correction_bias, before)


def test_bias_update_changes_selection_never_weights():
    model = _TwoBlocks()
    blk = model.blocks[0]
    x = torch.randn(4, 16, 64)
    model.train()
    with torch.no_grad():  # training mode counts; autograd is not needed here
        for _ in range(30):  # repeated updates on the same data until selections move
            model(x)
            update_expert_bias(model, speed=0.05)
    model.eval()
    with torch.no_grad():
        r0 = blk.gate(x.view(-1, 64))
        saved = blk.gate.e_score_correction_bias.clone()
        blk.gate.e_score_correction_bias.zero_()
        r1 = blk.gate(x.view(-1, 64))
        blk.gate.e_score_correction_bias.copy_(saved)
    assert not torch.equal(r0.topk_ids.sort(-1).values, r1.topk_ids.sort(-1).values)
    torch.testing.assert_close(r0.scores, r1.scores, rtol=0, atol=0)
    # weights of the chosen experts are their unbiased, renormalised, scaled scores
    w = r0.scores.gather(1, r0.topk_ids)
    torch.testing.assert_close(r0.topk_weights, 2.5 * w / w.sum(-1, keepdim=True))


def test_bias_update_balances_load():
    torch.manual_seed(0)
    model = _TwoBlocks()
    blk = model.blocks[0]
    with torch.no_grad():
        blk.gate.weight[0] += 0.5  # a skewed router: expert 0 dominates
    x = torch.randn(8, 16, 64)
    model.train()
    with torch.no_grad():
        _, infos = model(x)
        first = max_vio(infos[0].counts)
        for _ in range(30):
            model(x)
            update_expert_bias(model, speed=0.02)
        _, infos = model(x)
    assert max_vio(infos[0].counts) < first


def test_blocks_without_bias_still_report_stats():
    model = _TwoBlocks(topk_method="greedy", scoring_func="softmax")
    model.train()
    model(torch.randn(1, 8, 64))
    stats = update_expert_bias(model, speed=0.1)
    assert set(stats) == {1, 2} and model.blocks[0].gate.e_score_correction_bias is None
    assert model.blocks[0].tokens_per_expert.sum() == 0


def test_all_reduce_hook_sees_counts():
    model = _TwoBlocks()
    model.train()
    model(torch.randn(1, 8, 64))
    seen = []
    update_expert_bias(model, speed=0.1, all_reduce=lambda t: (seen.append(t.sum().item()), t.mul_(2)))
    assert seen == [16.0, 16.0]


def test_load_tracker_accumulates_for_global_max_vio():
    model = _TwoBlocks().eval()
    tracker = LoadTracker()
    total = torch.zeros(8)
    with torch.no_grad():
        for _ in range(3):
            _, infos = model(torch.randn(2, 8, 64))
            tracker.update(infos)
            total += infos[0].counts
    assert tracker.max_vio()[1] == pytest.approx(max_vio(total))
    assert tracker.dead_experts()[1] == dead_experts(total)
    s = tracker.summary()
    assert s["max_vio_max"] >= s["max_vio_mean"] >= 0
    assert model.blocks[0].tokens_per_expert.sum() == 0  # eval: the tracker, not the buffer, counts
    tracker.reset()
    assert tracker.max_vio() == {}
