"""DCPCheckpointer in one process (no process group): the layout on disk, a bit-exact round trip of model,
optimizer and host state, retention, a save cut short, damaged files named, a checkpoint of another
model refused, pickled code refused, and `export_checkpoint`'s destination rules. The multi-process
resharding matrix, the killed rank and the transformers export are in tests/dist/test_dist_checkpoint.py."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import pytest
import tokenizers
import torch

from widemoe.data.tokenizer import EOS_TOKEN, PAD_TOKEN, Tokenizer
from widemoe.hf import load_pretrained
from widemoe.hf.staging import DestinationError
from widemoe.model.causal_lm import build_model
from widemoe.presets import get_preset
from widemoe.train.checkpoint import CheckpointDamaged
from widemoe.train.dcp import CheckpointMismatch, DCPCheckpointer, export_checkpoint, layout_notices


def trained(seed: int = 0, steps: int = 2):  # noqa: ANN201
    model = build_model(get_preset("micro"), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 256, (2, 17), generator=g)
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def host_state(step: int) -> dict:
    torch.manual_seed(1234)
    return {"step": step, "tokens_seen": 64 * step, "scheduler": {"last_epoch": step}, "data": '{"pos": 7}',
            "torch_rng": torch.get_rng_state(), "python_rng": json.dumps(random.Random(5).getstate()),
            "train_config": "{}"}


def tiny_tokenizer() -> Tokenizer:
    vocab = {EOS_TOKEN: 0, PAD_TOKEN: 1, "a": 2, "b": 3}
    return Tokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="a")))


def flat(model, opt) -> dict[str, torch.Tensor]:  # noqa: ANN001
    out = {f"p/{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"b/{n}": b.clone() for n, b in model.named_buffers() if "correction_bias" in n})
    for n, p in model.named_parameters():
        for k, v in opt.state[p].items():
            out[f"{k}/{n}"] = v.clone()
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):  # noqa: ANN001, ANN201
    run = tmp_path_factory.mktemp("run")
    model, opt = trained()
    for moe in model.moe_blocks():  # a non-zero balancing bias must round-trip too
        moe.gate.e_score_correction_bias.uniform_(-1, 1)
    ckpt = DCPCheckpointer().save(run, 2, model, opt, host_state(2), tokenizer=tiny_tokenizer())
    return run, ckpt, flat(model, opt)


def test_layout_on_disk(saved) -> None:  # noqa: ANN001
    run, ckpt, _ = saved
    names = {p.name for p in ckpt.iterdir()}
    assert {"COMMITTED", ".metadata", "__0_0.distcp", "trainer_state.pt", "rng-rank00000.pt", "config.json",
            "tokenizer.json", "tokenizer_config.json"} <= names, names
    assert not list(ckpt.glob("*.safetensors"))
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "deepseek_v3"
    assert DCPCheckpointer().latest(run) == ckpt
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp" in p.name]


def test_round_trip_bit_exact(saved) -> None:  # noqa: ANN001
    _, ckpt, ref = saved
    model, opt = trained(seed=3, steps=1)  # other weights, other optimizer state
    st = DCPCheckpointer().load(ckpt, model, opt)
    got = flat(model, opt)
    assert sorted(got) == sorted(ref)
    bad = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert bad == []
    want = host_state(2)
    assert st["step"] == 2 and st["tokens_seen"] == 128 and st["scheduler"] == {"last_epoch": 2}
    assert st["data"] == want["data"] and st["python_rng"] == want["python_rng"]
    assert torch.equal(st["torch_rng"], want["torch_rng"])
    assert st["saved_layout"] == {"world_size": 1, "ep": 1} and st["load_notices"] == []
    assert opt.param_groups[0]["lr"] == 1e-3


def test_layout_notices_name_the_rng_choice() -> None:
    notes = layout_notices({"world_size": 2, "ep": 2}, {"world_size": 4, "ep": 4})
    assert notes[0].startswith("resharded: saved on 2") and "ranks 2-3" in notes[1] and "rank 0's" in notes[1]
    assert "not used" in layout_notices({"world_size": 2, "ep": 2}, {"world_size": 1, "ep": 1})[1]


def test_retention_and_a_save_cut_short(tmp_path: Path) -> None:
    model, opt = trained(steps=1)
    ck = DCPCheckpointer()
    for step in (1, 2, 3):
        ck.save(tmp_path, step, model, opt, host_state(step), keep_last=2)
    assert [p.name for p in ck.checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]

    def die(rank: int, tmp: Path) -> None:
        raise KeyboardInterrupt  # stands for a kill after this rank's files, before the commit

    with pytest.raises(KeyboardInterrupt):
        DCPCheckpointer(after_write=die).save(tmp_path, 4, model, opt, host_state(4))
    assert ck.latest(tmp_path).name == "step-00000003"
    assert (tmp_path / "checkpoints" / "step-00000004.tmp-dcp").is_dir()
    ck.save(tmp_path, 5, model, opt, host_state(5), keep_last=2)  # a later commit clears the leftover
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003", "step-00000005"]


@pytest.fixture(scope="module")
def victim():  # noqa: ANN201
    """A model and optimizer that loads of damaged copies are tried on (each fails before touching it)."""
    model = build_model(get_preset("micro"), seed=3)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _damaged_copy(saved, tmp_path: Path) -> Path:  # noqa: ANN001
    import shutil

    dst = tmp_path / "step-00000002"
    shutil.copytree(saved[1], dst)
    return dst


@pytest.mark.parametrize("name", ["__0_0.distcp", "rng-rank00000.pt", "trainer_state.pt", ".metadata"])
@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_damaged_file_is_named(saved, victim, tmp_path: Path, name: str, how: str) -> None:  # noqa: ANN001
    ckpt = _damaged_copy(saved, tmp_path)
    f = ckpt / name
    if how == "missing":
        f.unlink()
    else:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointDamaged, match=str(f).replace(".", r"\.")):
        DCPCheckpointer().load(ckpt, *victim)


def test_corrupt_shard_bytes_are_damage_not_a_crash(saved, victim, tmp_path: Path) -> None:  # noqa: ANN001
    ckpt = _damaged_copy(saved, tmp_path)
    f = ckpt / "__0_0.distcp"
    f.write_bytes(b"\0" * f.stat().st_size)  # right length, garbage inside
    with pytest.raises(CheckpointDamaged, match="unreadable or corrupt"):
        DCPCheckpointer().load(ckpt, *victim)


def test_metadata_with_code_is_refused(saved, victim, tmp_path: Path) -> None:  # noqa: ANN001
    ckpt = _damaged_copy(saved, tmp_path)

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (print, ("pwned",))

    (ckpt / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointDamaged, match=r"refusing builtins\.print"):
        DCPCheckpointer().load(ckpt, *victim)


def test_another_model_is_a_mismatch_not_damage(saved) -> None:  # noqa: ANN001
    other = build_model(get_preset("micro", moe_intermediate_size=16), seed=0)
    opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    with pytest.raises(CheckpointMismatch, match="shapes differ") as e:
        DCPCheckpointer().load(saved[1], other, opt)
    assert not isinstance(e.value, CheckpointDamaged)


def test_export_one_process(saved, tmp_path: Path) -> None:  # noqa: ANN001
    run, ckpt, ref = saved
    info = export_checkpoint(run, tmp_path / "hf")
    assert info.checkpoint == ckpt and info.step == 2 and info.family == "deepseek_v3"
    again = load_pretrained(tmp_path / "hf", dtype=torch.float32)
    for n, p in again.named_parameters():
        assert torch.equal(p, ref[f"p/{n}"]), n
    for n, b in again.named_buffers():
        if "correction_bias" in n:
            assert torch.equal(b, ref[f"b/{n}"]), n
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_export_refuses_a_non_empty_destination(saved, tmp_path: Path) -> None:  # noqa: ANN001
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(DestinationError, match="--overwrite"):
        export_checkpoint(saved[0], dst)
    assert [p.name for p in dst.iterdir()] == ["notes.txt"]
    info = export_checkpoint(saved[0], dst, dtype="bf16", overwrite=True)
    assert info.dtype == "bf16" and (dst / "notes.txt").read_text() == "mine"
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_command_refuses_with_one_line(saved, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from widemoe.cli import ErrorExit, main

    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "x").write_text("")
    with pytest.raises(ErrorExit) as e:
        main(["export", str(saved[0]), str(dst)])
    assert e.value.code == 1 and "not empty; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(ErrorExit, match="no COMMITTED marker|without a committed checkpoint"):
        main(["export", str(tmp_path / "hf"), str(tmp_path / "out")])  # a directory that is no checkpoint


def test_v4_parameters_without_optimizer_state_stay_without(tmp_path: Path) -> None:
    """A DeepSeek-V4 compressor unused at a short sequence gets no gradient, hence no AdamW state: the
    checkpoint has none for it, and a load leaves it without (not a missing key, not a fresh state)."""
    cfg = get_preset("v4-tiny", vocab_size=256)
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():  # the gradients of a short sequence: none for the compressors
        p.grad = None if ".compressor." in n else torch.randn(p.shape, generator=g)
    opt.step()
    stateless = [n for n, p in model.named_parameters() if not opt.state[p]]
    assert stateless and all(".compressor." in n for n in stateless)  # the case this test is about
    ck = DCPCheckpointer()
    ck.save(tmp_path, 1, model, opt, host_state(1))
    again = build_model(cfg, seed=1)
    opt2 = torch.optim.AdamW(again.parameters(), lr=1e-3)
    ck.load(ck.latest(tmp_path), again, opt2)
    assert [n for n, p in again.named_parameters() if not opt2.state[p]] == stateless
    assert flat(again, opt2).keys() == flat(model, opt).keys()
    assert all(torch.equal(a, b) for a, b in zip(flat(again, opt2).values(), flat(model, opt).values()))


def test_other_format_is_not_damage_checkpointer_for_picks(saved, tmp_path) -> None:  # noqa: ANN001
    from widemoe.train.checkpoint import HFCheckpointer
    from widemoe.train.dcp import CheckpointFormatError, checkpointer_for

    model, opt = trained(steps=1)
    hf_run = tmp_path / "hf-run"
    hf_ckpt = HFCheckpointer().save(hf_run, 1, model, opt, host_state(1))
    with pytest.raises(CheckpointFormatError, match="Hugging Face checkpoint of a one-process run") as e:
        DCPCheckpointer().read_state(hf_ckpt)
    assert not isinstance(e.value, CheckpointDamaged)  # the trainer must not set it aside as damaged
    assert isinstance(checkpointer_for(hf_run, distributed=False), HFCheckpointer)
    assert isinstance(checkpointer_for(saved[0], distributed=False), DCPCheckpointer)  # W ranks -> 1
    assert isinstance(checkpointer_for(tmp_path / "new", distributed=True), DCPCheckpointer)
    assert isinstance(checkpointer_for(tmp_path / "new", distributed=False), HFCheckpointer)


def test_export_of_a_one_process_run(tmp_path: Path) -> None:
    """A run of HFCheckpointer checkpoints exports too (the same command for every run)."""
    from widemoe.train.checkpoint import HFCheckpointer

    model, opt = trained(steps=1)
    HFCheckpointer().save(tmp_path / "run", 1, model, opt, host_state(1))
    info = export_checkpoint(tmp_path / "run", tmp_path / "hf", dtype="bf16")
    assert info.step == 1 and info.dtype == "bf16"
    again = load_pretrained(tmp_path / "hf", dtype=torch.float32)
    name, p = next(iter(again.named_parameters()))
    assert torch.equal(p, dict(model.named_parameters())[name].detach().bfloat16().float())


def test_trainer_resume_through_dcp_is_exact(tmp_path: Path, corpus, cache_dir) -> None:  # noqa: ANN001
    """The real Trainer's state (scheduler, data cursor, RNGs, fused two-group AdamW) through DCP in one
    process: a run stopped at step 3 and resumed equals the straight run, loss for loss, bit for bit."""
    from test_train import tc_for, train_losses
    from widemoe.train.build import prepare_train_data
    from widemoe.train.loop import Trainer

    def trainer(run: str, **kw):  # noqa: ANN202, ANN003
        tc = tc_for(tmp_path / run, steps=5, **kw)
        td = prepare_train_data(tc, corpus, cache_dir)
        return Trainer(tc, td, tokenizer=td.tokenizer, checkpointer=DCPCheckpointer())

    straight = trainer("a")
    straight.fit()
    trainer("b", stop_at=3).fit()
    assert (tmp_path / "b" / "checkpoints" / "step-00000003" / ".metadata").is_file()
    resumed = trainer("b", resume=True)
    resumed.fit()
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
