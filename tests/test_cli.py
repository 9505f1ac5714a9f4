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
