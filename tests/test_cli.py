"""The command line: help on every verb, and bad input rejected before any heavy work."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

from sweeper.cli import VERBS, main
from sweeper.progress import PlainProgress, progress_bar
from tests.conftest import TINY, run_cli


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help_with_an_example(verb: str) -> None:
    result = run_cli(verb, "--help")
    assert result.returncode == 0
    assert "example:" in result.stdout and f"python -m sweeper {verb}" in result.stdout


@pytest.mark.parametrize(("override", "message"), [
    ("optimizer.name=adam", "optimizer.name: 'adam' is not allowed; choose one of adamw, sgd"),
    ("lora.rank=4", "lora.rank"),
    ("model.quant_type=nf3", "model.quant_type: 'nf3' is not allowed; choose one of nf4, fp4, int8, none"),
    ("train.max_steps=0", "train.max_steps: must be > 0"),
    ("study/sampler=bayes", "study/sampler"),
    ("study.pruner.name=sometimes", "study.pruner.name: 'sometimes' is not allowed"),
    ("workers.per_gpu=0", "workers.per_gpu: must be > 0"),
    ("model.gradient_checkpointing=sometimes",
     "model.gradient_checkpointing: 'sometimes' is not allowed; choose one of true, false, auto"),
    ("model.gradient_checkpointing=0", "model.gradient_checkpointing: 0 is not allowed"),
])
def test_bad_input_exits_before_heavy_work(tmp_path: Path, override: str, message: str) -> None:
    result = run_cli("launch", override, f"output_dir={tmp_path}")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # nothing written to the study or MLflow


def test_options_and_overrides_in_any_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(Path(__file__).resolve().parent.parent / "conf" / "config.yaml")
    with mock.patch.dict(os.environ):  # main() sets the libraries' variables for this process
        assert main(["space", "search_space=none", "--config", config, "lora.r=4", "lora.dropout=0.2"]) == 0
        fixed = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line.startswith("  "))
        assert (fixed["lora.r"], fixed["lora.dropout"]) == ("4", "0.2")
        with pytest.raises(SystemExit) as e:
            main(["space", "lora.r=4", "--no-such-option", "lora.dropout=0.2"])
        assert e.value.code == 2 and "unrecognized arguments: --no-such-option" in capsys.readouterr().err
    # The override after the option is read: its bad value stops the launch before anything runs.
    result = run_cli("launch", "model=tiny_random", "--no-progress", "optimizer.name=adam", f"output_dir={tmp_path}")
    assert result.returncode == 2 and "optimizer.name: 'adam' is not allowed" in result.stderr, result.stderr
    assert not any(tmp_path.iterdir())


def test_space_has_a_header_and_says_continuous(capsys: pytest.CaptureFixture[str]) -> None:
    with mock.patch.dict(os.environ):  # main() sets the libraries' variables for this process
        assert main(["space", "search_space=optimizer"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("search space (") and lines[0].endswith(" parameters, continuous):")
        assert lines[1].split() == ["name", "path", "distribution", "condition"]
        assert main(["space", "search_space=targets"]) == 0
        assert "(1 parameters, 4 configurations)" in capsys.readouterr().out


def test_plain_progress_off_a_terminal() -> None:
    log = io.StringIO()
    bar = progress_bar(10, "sweep s", "trial", stream=log)
    assert isinstance(bar, PlainProgress)
    bar.every_s = 3600
    bar.update(3)
    bar.set_postfix(best="1.5", refresh=True)
    assert log.getvalue() == ""  # not yet: a line at most every every_s seconds
    bar.close()
    assert re.fullmatch(r"sweep s: 3/10 trials, \d+s elapsed, ~\d+s left, best=1\.5\n", log.getvalue())

    steps = PlainProgress(2, "trial 0", "step", leave=False, stream=log, every_s=0)
    steps.update(1)
    steps.set_postfix_str("loss=1.000, evaluating")
    steps.close()  # a trial's bar is not kept: its last line is the sweep's line for the trial
    assert log.getvalue().splitlines()[1:] == [
        "trial 0: 1/2 steps, 0s elapsed, ~0s left", "trial 0: 1/2 steps, 0s elapsed, ~0s left, loss=1.000, evaluating"]
    assert "\r" not in log.getvalue() and "\033[" not in log.getvalue()
    assert not isinstance(progress_bar(2, "off", "step", disable=True, stream=log), PlainProgress)


@pytest.mark.parametrize("columns", [0, 80])
def test_a_terminal_without_a_width_gets_plain_lines(columns: int) -> None:
    """A pseudo-terminal that reports 0 columns (some wrappers' default) draws no tqdm bar: plain lines there."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    with open(follower, "w") as stream:
        bar = progress_bar(2, "trial 0", "step", stream=stream)
        assert isinstance(bar, PlainProgress) is (columns == 0)
        bar.close()
    os.close(leader)


def test_a_trial_bar_says_evaluating_before_each_evaluation() -> None:
    from sweeper.objective import TrialHooks

    log = io.StringIO()
    train = SimpleNamespace(eval_every=8, max_steps=100)
    objective = SimpleNamespace(cfg=SimpleNamespace(train=train), tracker=None)
    # The trial's own schedule: the space may sample it.
    hooks = TrialHooks(objective, None, {"train.eval_every": 2, "train.max_steps": 3},  # type: ignore[arg-type]
                       PlainProgress(3, "trial 0", "step", stream=log, every_s=0))
    evaluating = []
    for step in (1, 2, 3):
        hooks.on_step(step, {"train_loss": 1.0})
        evaluating.append(log.getvalue().splitlines()[-1].endswith("loss=1.000, evaluating"))
    assert evaluating == [False, True, True]


def test_a_launch_is_quiet_with_one_line_per_trial_and_verbose_with_v(tmp_path: Path) -> None:
    out = f"output_dir={tmp_path}"
    in_process = "workers.engines=1"  # on a GPU, auto would run its engines as workers, whose lines go to their logs
    quiet = run_cli("launch", *TINY, "study.n_trials=2", in_process, out)
    assert quiet.returncode == 0, quiet.stderr
    text = quiet.stdout + quiet.stderr
    for noise in ("kernels-community", "pip install kernels", "FutureWarning", "Trial 0 finished with value",
                  "Creating initial MLflow database tables", "A new study created", "Loading weights"):
        assert noise not in text, text
    assert finished_lines(quiet.stdout) == [0, 1], quiet.stdout
    assert "\r" not in quiet.stderr and "\033[" not in quiet.stderr  # no tqdm off a terminal
    assert re.search(r"base .+ loaded on \S+ in [\d.]+s", quiet.stderr)
    assert re.search(r"data ready in [\d.]+s: \d+ train / \d+ eval examples", quiet.stderr)

    verbose = run_cli("launch", "-v", *TINY, "study.n_trials=3", in_process, out, "--no-progress")
    assert verbose.returncode == 0, verbose.stderr
    assert "Trial 2 finished with value" in verbose.stderr
    assert finished_lines(verbose.stdout) == [2]


def finished_lines(stdout: str) -> list[int]:
    """Trial numbers of the one-line summaries a launch prints per finished trial."""
    return [int(n) for n in re.findall(r"^trial (\d+) (?:complete|pruned|failed)  ", stdout, re.MULTILINE)]
