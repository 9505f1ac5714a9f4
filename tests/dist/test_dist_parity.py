"""FSDP2 + expert parallelism against one process on the same global batch, fp32, DeepSeek-V3-style
micro model with MTP and a DeepSeek-V4 model, at (W, EP) in {(2,1), (2,2), (4,2), (4,4)} (two launches)."""

from __future__ import annotations

import pytest
from launch import torchrun

LAUNCHES = {2: (1, 2), 4: (2, 4)}  # world size -> EP degrees checked in that launch


@pytest.mark.parametrize("nproc", sorted(LAUNCHES), ids=lambda w: f"W{w}")
def test_fsdp_ep_matches_one_process(nproc: int) -> None:
    eps = LAUNCHES[nproc]
    res, out = torchrun("parity.py", nproc, "--eps", ",".join(map(str, eps)), timeout=400)
    for prefix in (f"ep{ep}/{fam}" for ep in eps for fam in ("v3", "v4")):
        r = {k.removeprefix(prefix + "/"): v for k, v in res.items() if k.startswith(prefix + "/")}
        assert r, (prefix, out[-3000:])
        assert r["grad_names_differ"] == []
        # step-0 gradients per tensor, relative to its max |g| (floored at 1e-3 of the model's max |g|)
        assert r["grad_rel_err"] <= 1e-5, (prefix, r)
        # expert gradients EP x too large (the all-to-all's sum averaged over efsdp only) would read EP here
        assert abs(r["expert_grad_norm_ratio"] - 1) <= 1e-5, (prefix, r)
        assert r["grad_norm_rel_err"] <= 1e-6, (prefix, r)  # the total norm that clipping uses
        assert r["loss_abs_err"] <= 1e-5, (prefix, r)  # 10 SGD steps with clipping and the bias update
        assert r["param_abs_err"] <= 1e-6, (prefix, r)
        assert r["bias_same_on_all_ranks"] is True and r["bias_abs_err_vs_single"] == 0.0, (prefix, r)
        assert r["bias_moved"] > 0, (prefix, r)
