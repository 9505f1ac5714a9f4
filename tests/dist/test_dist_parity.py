"""FSDP2 + expert parallelism against one process on the same global batch, fp32, DeepSeek-V3-style
micro model with MTP and a DeepSeek-V4 model, at (W, EP) in {(2,1), (2,2), (4,2), (4,4)}."""

from __future__ import annotations

import pytest
from launch import torchrun

LAYOUTS = [(2, 1), (2, 2), (4, 2), (4, 4)]


@pytest.mark.parametrize(("nproc", "ep"), LAYOUTS, ids=[f"W{w}-EP{e}" for w, e in LAYOUTS])
def test_fsdp_ep_matches_one_process(nproc: int, ep: int) -> None:
    res, out = torchrun("parity.py", nproc, "--ep", str(ep), timeout=400)
    for fam in ("v3", "v4"):
        r = {k.split("/", 1)[1]: v for k, v in res.items() if k.startswith(fam + "/")}
        assert r, out[-3000:]
        assert r["grad_names_differ"] == []
        assert r["grad_rel_err"] <= 1e-5, r  # step-0 gradients per tensor, relative to max |g|
        # expert gradients EP x too large (the all-to-all's sum averaged over efsdp only) would read EP here
        assert abs(r["expert_grad_norm_ratio"] - 1) <= 1e-5, r
        assert r["grad_norm_rel_err"] <= 1e-6, r  # the total norm that clipping uses
        assert r["loss_abs_err"] <= 1e-5, r  # 10 SGD steps with clipping and the bias update
        assert r["param_abs_err"] <= 1e-6, r
        assert r["bias_same_on_all_ranks"] is True and r["bias_abs_err_vs_single"] == 0.0, r
        assert r["bias_moved"] > 0, r
