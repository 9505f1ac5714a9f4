"""The `widemoe` command line: help, generate on a preset, clear refusals."""

import pytest

from widemoe.cli import main


def test_help_lists_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for cmd in ("generate", "inspect", "convert", "cost"):
        assert cmd in out


def test_generate_on_random_preset(capsys):
    assert main(["generate", "micro", "Hi", "there", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("Hi") and lines[1].startswith("there")
    assert "tokens/s" in captured.err


def test_generate_refuses_a_model_that_cannot_fit(capsys):
    with pytest.raises(SystemExit, match="deepseek-v3 has 682.6B parameters.*does not fit"):
        main(["generate", "deepseek-v3", "x"])


def test_generate_unknown_preset_is_clear():
    with pytest.raises(SystemExit, match="unknown preset 'nope'"):
        main(["generate", "nope", "x"])


def test_generate_from_a_training_run_uses_its_checkpoint_and_tokenizer(tmp_path, capsys):
    from corpus_helpers import subset
    from widemoe import data as wdata
    from widemoe.train.config import TrainConfig
    from widemoe.train.run import run_training

    corpus = subset(wdata.build_corpus(math_chars=60_000), 12)
    tc = TrainConfig(run_dir=str(tmp_path / "run"), preset="micro", vocab_size=512, seq_len=32, batch_size=4,
                     steps=2, warmup_steps=1, eval_every=2, eval_batches=1, save_every=2, progress=False)
    run_training(tc, corpus=corpus, cache_dir=tmp_path / "cache")
    assert main(["generate", str(tmp_path / "run"), "It was", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("It was")
    assert "step-00000002" in captured.err


def test_generate_on_a_run_without_checkpoint_is_clear(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(SystemExit, match="without a committed checkpoint"):
        main(["generate", str(tmp_path), "x"])
