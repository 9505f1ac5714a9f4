"""DCP checkpoints that reshard, a rank killed during a save, and `widemoe export` of a sharded checkpoint.

Three torchrun launches (each costs 10-40 s here), several checks each (tests/dist/scripts/ckpt_reshard.py):
  A, W=2: save at (2, EP2), then a save of a later step with rank 1 killed before the commit;
  B, W=4: load A at (4, EP2) and (4, EP4), then save at (4, EP2);
  P, W=1: a plain process (no torchrun) loads A, then saves at W=1;
  C, W=2: load A at (2, EP1), B at (2, EP2) (4 -> 2) and P (1 -> 2), and a copy of A whose rank-1 RNG
          file is cut;
and A exported in this process. Every load is compared
bit for bit with full tensors (`DTensor.full_tensor()`) of what was saved, checks the host state, the
per-rank RNG rule and the layout notices, and takes 2 more steps that must match the saving run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from launch import MARK, SCRIPTS, torchrun

from widemoe.cli import main
from widemoe.train.dcp import DCPCheckpointer

transformers = pytest.importorskip("transformers")


def plain(script: str, *args: str, timeout: float = 120) -> dict[str, object]:
    """Results of `script` as one plain process (no torchrun: a world of one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(SCRIPTS), str(SCRIPTS.parent.parent), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True,
                         timeout=timeout, env=env)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    return {r["name"]: r["value"] for r in (json.loads(line[len(MARK):]) for line in res.stdout.splitlines()
                                            if line.startswith(MARK))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("dcp")
    a, b = root / "A", root / "B"
    saved_a, out_a = torchrun("ckpt_reshard.py", 2, "--save", f"{a}:2", "--crash", expect_rc=1, timeout=150)
    loads_b, out_b = torchrun("ckpt_reshard.py", 4, "--load", f"{a}:2,4", "--save", f"{b}:2", timeout=200)
    one = plain("ckpt_reshard.py", "--load", f"{a}:1", "--save", f"{root / 'P'}:1")
    return {"A": a, "B": b, "P": root / "P", "saved_a": saved_a, "out_a": out_a, "loads_b": loads_b,
            "out_b": out_b, "one": one}


def check_load(res: dict, tag: str, saved: dict, now: dict, out: str) -> None:
    r = {k[len(tag) + 1:]: v for k, v in res.items() if k.startswith(tag + "/")}
    assert r, out[-3000:]
    assert r["names_differ"] == [] and r["not_bit_exact"] == [], r
    assert r["host_state_ok"] is True and r["rng_ok"] is True, r
    assert r["saved_layout"] == saved, r
    assert r["group_lrs"] == [5e-4, 2.5e-4], r  # the optimizer's param groups come back too
    notices = r["notices"]
    assert notices[0] == (f"resharded: saved on {saved['world_size']} process(es) with EP={saved['ep']}, "
                          f"loaded on {now['world_size']} with EP={now['ep']}"), notices
    if now["world_size"] > saved["world_size"]:
        assert "did not exist at save time: continuing from rank 0's torch RNG state" in notices[1], notices
    assert r["loss_abs_err"] <= 1e-5, r  # two more AdamW steps continue the saving run


def test_killed_rank_leaves_the_previous_checkpoint(runs) -> None:  # noqa: ANN001
    a = runs["A"]
    assert runs["saved_a"]["save/W2-EP2"] == "step-00000002", runs["out_a"][-3000:]
    assert "crash/survived" not in runs["saved_a"]
    ck = DCPCheckpointer()
    assert [p.name for p in ck.checkpoints(a)] == ["step-00000002"]
    half = a / "checkpoints" / "step-00000004.tmp-dcp"
    # rank 1 died in the hook, after its files: they are there, the commit is not
    assert (half / "__1_0.distcp").is_file() and (half / "rng-rank00001.pt").is_file()
    assert not (half / "COMMITTED").exists() and not (a / "checkpoints" / "step-00000004").exists()
    assert ck.read_state(ck.latest(a))["step"] == 2  # and it loads: every test below loads it


def test_reshard_2_to_4(runs) -> None:  # noqa: ANN001
    for ep in (2, 4):
        now = {"world_size": 4, "ep": ep}
        check_load(runs["loads_b"], f"load/W4-EP{ep}", {"world_size": 2, "ep": 2}, now, runs["out_b"])
    assert runs["loads_b"]["save/W4-EP2"] == "step-00000002"


def test_reshard_2_to_2_ep1_4_to_2_and_1_to_2(runs) -> None:  # noqa: ANN001
    res, out = torchrun("ckpt_reshard.py", 2, "--load", f"{runs['A']}:1", "--load", f"{runs['B']}:2",
                        "--load", f"{runs['P']}:2", "--damaged", str(runs["A"]), timeout=150)
    check_load(res, "load/W2-EP1", {"world_size": 2, "ep": 2}, {"world_size": 2, "ep": 1}, out)
    check_load(res, "load/W2-EP2", {"world_size": 4, "ep": 2}, {"world_size": 2, "ep": 2}, out)
    # and a checkpoint of one plain process resumes on 2 (rank 1 did not exist: rank 0's RNG)
    check_load(res, "load/W2-EP2#P", {"world_size": 1, "ep": 1}, {"world_size": 2, "ep": 2}, out)
    assert "saved ranks 2-3 are not used" in res["load/W2-EP2/notices"][1]
    # a damaged file that only rank 1 reads: both ranks raise CheckpointDamaged naming it
    assert res["damaged/every_rank_names_the_file"] is True, out[-3000:]


def test_reshard_2_to_one_plain_process(runs) -> None:  # noqa: ANN001
    res = runs["one"]
    check_load(res, "load/W1-EP1", {"world_size": 2, "ep": 2}, {"world_size": 1, "ep": 1}, str(res))
    assert res["save/W1-EP1"] == "step-00000002"  # loaded on 2 ranks by launch C


def test_export_of_a_sharded_checkpoint_loads_in_transformers(runs, tmp_path, capsys) -> None:  # noqa: ANN001
    from widemoe.hf import load_pretrained

    dst = tmp_path / "hf"
    assert main(["export", str(runs["A"]), str(dst)]) == 0
    assert "exporting its newest committed checkpoint, step-00000002" in capsys.readouterr().out
    ref = torch.load(runs["A"] / "ref.pt", weights_only=True)["tensors"]
    ours = load_pretrained(dst, dtype=torch.float32)
    for n, p in ours.named_parameters():
        assert torch.equal(p, ref[f"p/{n}"]), n  # the full tensors of the W=2 EP=2 run
    for n, b in ours.named_buffers():
        if "correction_bias" in n:
            assert torch.equal(b, ref[f"b/{n}"]), n
    hf = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)
    assert (dst / "tokenizer.json").is_file() and (dst / "tokenizer_config.json").is_file()
