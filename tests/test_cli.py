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


# --- errors: one line; exit status 1 (failure) or 2 (usage); tracebacks only for bugs -----------------


def _error(argv, capsys) -> tuple[int, str]:
    """Exit status and stderr of a command that must fail."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return e.value.code, err


@pytest.mark.parametrize("spec", ["./no/such/dir", "runs/typo"])
def test_generate_on_a_missing_path_says_no_such_file(spec, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty directory: a `runs/` left by `make demo` must not change this
    code, err = _error(["generate", spec, "hi"], capsys)
    assert code == 1 and err == f"error: no such file or directory: {spec}\n"


def test_generate_unknown_preset_is_a_usage_error(capsys):  # as argparse's "invalid choice"
    code, err = _error(["generate", "nope", "x"], capsys)
    assert code == 2 and err.startswith("error: unknown preset 'nope'; presets: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--temperature", "nan", "argument --temperature: temperature=nan must be a finite number >= 0"),
        ("--temperature", "-1", "argument --temperature: temperature=-1.0 must be a finite number >= 0"),
        ("--top-p", "0", r"argument --top-p: top_p=0.0 must be in (0, 1]"),
        ("--top-p", "1.01", r"argument --top-p: top_p=1.01 must be in (0, 1]"),
        ("--top-k", "-1", "argument --top-k: top_k=-1 must be an integer >= 1"),
        ("--top-k", "0", "argument --top-k: top_k=0 must be an integer >= 1"),
        ("--max-new-tokens", "0", "argument --max-new-tokens: max_new_tokens=0 must be an integer >= 1"),
        ("--seed", "1.5", "argument --seed: invalid int value: '1.5'"),
        ("--max-new-tokens", "lots", "argument --max-new-tokens: invalid int value: 'lots'"),
    ],
)
def test_generate_bad_sampling_flags_are_usage_errors(flag, value, message, capsys):
    code, err = _error(["generate", "micro", "hi", flag, value], capsys)
    assert code == 2 and message in err


def test_generate_empty_prompt_is_one_line(capsys):
    code, err = _error(["generate", "micro", ""], capsys)
    assert code == 1 and err.startswith("error: prompt 0 is empty") and "at least one token" in err
    assert err.count("\n") == 1


class _CountingStdout:
    def __init__(self):
        self.text, self.flushes = "", 0

    def write(self, s):
        self.text += s
        return len(s)

    def flush(self):
        self.flushes += 1


def test_generate_streams_and_stops_at_the_position_limit(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "short.json"
    cfg.write_text('{"preset": "micro", "max_position_embeddings": 16}')
    out = _CountingStdout()
    monkeypatch.setattr("sys.stdout", out)
    assert main(["generate", str(cfg), "0123456789", "--max-new-tokens", "1000000000"]) == 0
    err = capsys.readouterr().err
    assert "stopped at the model's position limit (16 positions)" in err
    assert out.text.startswith("0123456789") and out.text.endswith("\n")
    assert out.flushes >= 2  # the prompt, then the new text as it comes


def test_generate_stops_at_max_new_tokens_without_a_limit_notice(capsys):
    assert main(["generate", "micro", "hi", "--max-new-tokens", "3"]) == 0
    assert "position limit" not in capsys.readouterr().err


def _failing_command(monkeypatch, exc: BaseException) -> None:
    import widemoe.commands.inspect as inspect_cmd

    def run(args):
        raise exc

    monkeypatch.setattr(inspect_cmd, "run", run)


@pytest.mark.parametrize(
    "exc,message",
    [
        (PermissionError(13, "Permission denied", "/data/run"), "error: permission denied: /data/run\n"),
        (IsADirectoryError(21, "Is a directory", "cfg.json"), "error: is a directory: cfg.json\n"),
        (NotADirectoryError(20, "Not a directory", "f/x"), "error: not a directory: f/x\n"),
        (OSError(28, "No space left on device"), "error: [Errno 28] No space left on device\n"),
        (ValueError("line one\n  line two"), "error: line one line two\n"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "error: 'utf-8' codec can't"),
    ],
)
def test_user_errors_become_one_line_and_exit_1(exc, message, monkeypatch, capsys):
    _failing_command(monkeypatch, exc)
    code, err = _error(["inspect", "x"], capsys)
    assert code == 1 and err.startswith(message) and err.count("\n") == 1


def test_a_damaged_safetensors_file_is_a_message(monkeypatch, capsys):
    from safetensors import SafetensorError

    _failing_command(monkeypatch, SafetensorError("Error while deserializing header: HeaderTooLarge"))
    code, err = _error(["inspect", "x"], capsys)
    assert code == 1 and err == "error: Error while deserializing header: HeaderTooLarge\n"


def test_a_bug_keeps_its_traceback(monkeypatch):
    _failing_command(monkeypatch, RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["inspect", "x"])


def test_ctrl_c_exits_130(monkeypatch, capsys):
    _failing_command(monkeypatch, KeyboardInterrupt())
    assert main(["inspect", "x"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_argparse_usage_errors_exit_2(capsys):
    code, err = _error(["generate"], capsys)
    assert code == 2 and "usage:" in err
    code, err = _error(["no-such-command"], capsys)
    assert code == 2 and "invalid choice" in err


def test_a_usage_error_class_exits_2(monkeypatch, capsys):
    from widemoe.cost import CostError

    _failing_command(monkeypatch, CostError("--mfu=2.0 must be in (0, 1]"))
    code, err = _error(["inspect", "x"], capsys)
    assert code == 2 and err == "error: --mfu=2.0 must be in (0, 1]\n"


def test_report_on_a_file_says_it_is_not_a_directory(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hi")
    assert main(["report", str(tmp_path / "a.txt")]) == 1  # a directory it cannot use: a failure
    assert capsys.readouterr().err == f"error: run directory {tmp_path / 'a.txt'} is not a directory\n"
