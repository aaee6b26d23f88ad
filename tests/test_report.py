"""The trial table: real Optuna studies (SQLite and in-memory) with complete, pruned and failed trials."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from sweeper.report import (
    BOLD_GREEN,
    MARK,
    MIN_TRIALS_FOR_IMPORTANCE,
    RED,
    RESET,
    key_params,
    param_importances,
    report_table,
    sampled_values,
    short_names,
    spread,
    trial_line,
    use_color,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

T0 = dt.datetime(2026, 1, 1, 12, 0, 0)
LR = FloatDistribution(1e-5, 1e-2, log=True)
R = CategoricalDistribution([8, 16])
DROPOUT = FloatDistribution(0.0, 0.1)


def add(study: optuna.Study, state: TrialState, seconds: float | None, params: dict[str, Any],
        dists: dict[str, Any], values: Sequence[float] | None = None, reason: str = "") -> None:
    """Add a finished trial with a known wall time (add_trial keeps the given datetimes)."""
    study.add_trial(optuna.trial.FrozenTrial(
        number=0, trial_id=0, state=state, value=None, values=list(values) if values else None,
        datetime_start=T0, datetime_complete=None if seconds is None else T0 + dt.timedelta(seconds=seconds),
        params=params, distributions=dists, user_attrs={"state_reason": reason} if reason else {},
        system_attrs={}, intermediate_values={1: 3.2} if state == TrialState.PRUNED else {}))


@pytest.fixture
def study(tmp_path: Path) -> optuna.Study:
    """Two complete trials (#1 best), one pruned, one failed, one still running; dropout never varies."""
    s = optuna.create_study(study_name="qlora-test", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    s.set_user_attr("objectives", ["eval_loss"])
    dists = {"lora.r": R, "optimizer.lr": LR, "lora.dropout": DROPOUT}
    add(s, TrialState.COMPLETE, 12.5, {"lora.r": 8, "optimizer.lr": 1e-4, "lora.dropout": 0.05}, dists, [2.5])
    add(s, TrialState.COMPLETE, 125, {"lora.r": 16, "optimizer.lr": 3e-3, "lora.dropout": 0.05}, dists, [2.125])
    add(s, TrialState.PRUNED, 3725, {"lora.r": 8, "optimizer.lr": 9e-3, "lora.dropout": 0.05}, dists,
        reason="pruned at step 10: eval_loss 3.2000")
    add(s, TrialState.FAIL, 0.4, {"lora.r": 16, "optimizer.lr": 2e-5, "lora.dropout": 0.05}, dists,
        reason="OutOfMemoryError: CUDA out of memory\nTraceback (most recent call last): ...")
    running = s.ask()
    running.suggest_float("optimizer.lr", 1e-5, 1e-2, log=True)
    return s


def rows(table: str) -> dict[int, str]:
    """Trial number -> its line (after the title, header and rule; before the legend)."""
    return {int(line[3:].split()[0]): line for line in table.splitlines()[3:-1]}


def header(table: str) -> list[str]:
    return table.splitlines()[1].split()


def test_title_counts_every_state(study: optuna.Study) -> None:
    title = report_table(study, color=False).splitlines()[0]
    assert title == ("study qlora-test (minimize eval_loss): 5 trials: 2 complete, 1 pruned, 1 failed, "
                     "1 running")


def test_columns_put_the_most_varying_parameter_first(study: optuna.Study) -> None:
    assert header(report_table(study, color=False)) == [
        "#", "state", "eval_loss", "lr", "r", "dropout", "duration", "reason"]


def test_max_params_keeps_the_most_varying_ones(study: optuna.Study) -> None:
    assert header(report_table(study, max_params=1, color=False)) == [
        "#", "state", "eval_loss", "lr", "duration", "reason"]
    assert header(report_table(study, max_params=0, color=False)) == [
        "#", "state", "eval_loss", "duration", "reason"]


def test_rows_show_values_params_durations_and_reasons(study: optuna.Study) -> None:
    table = report_table(study, color=False)
    by_number = rows(table)
    assert by_number[0].split() == ["0", "complete", "2.5", "0.0001", "8", "0.05", "12.5s"]
    assert by_number[1].split() == [MARK, "1", "complete", "2.125", "0.003", "16", "0.05", "2m05s"]
    assert by_number[2].split()[:7] == ["2", "pruned", "-", "0.009", "8", "0.05", "1h02m"]
    assert by_number[2].endswith("pruned at step 10: eval_loss 3.2000")
    assert by_number[3].endswith("OutOfMemoryError: CUDA out of memory")  # first line of the reason only
    assert "Traceback" not in table
    # The running trial sampled only the learning rate and has no end time yet.
    assert by_number[4].split()[:2] == ["4", "running"]
    assert by_number[4].split()[-3:] == ["-", "-", "-"]


def test_best_trial_is_marked_and_named_in_the_legend(study: optuna.Study) -> None:
    table = report_table(study, color=False)
    marked = [n for n, line in rows(table).items() if line.startswith(MARK)]
    assert marked == [1]
    assert table.splitlines()[-1] == f"{MARK} best trial: #1 (eval_loss 2.125)"


def test_color_highlights_the_best_row_and_failed_state(study: optuna.Study) -> None:
    plain = report_table(study, color=False)
    colored = report_table(study, color=True)
    assert "\033[" not in plain
    best_line = next(line for line in colored.splitlines() if line.startswith(BOLD_GREEN))
    assert best_line == f"{BOLD_GREEN}{rows(plain)[1]}{RESET}"
    assert f"{RED}failed" in colored
    # Without the escape codes, the colored table is the plain one.
    for code in (BOLD_GREEN, RED, RESET, "\033[1m", "\033[33m"):
        colored = colored.replace(code, "")
    assert [line.rstrip() for line in colored.splitlines()] == plain.splitlines()


def test_color_is_off_for_pipes_and_no_color(study: optuna.Study, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert "\033[" not in report_table(study)  # pytest's captured stdout is no terminal
    master, replica = os.openpty()  # a real terminal; it stays one while the master end is open
    try:
        with open(replica, "w") as terminal:
            assert use_color(terminal)
            monkeypatch.setenv("NO_COLOR", "1")
            assert not use_color(terminal)
    finally:
        os.close(master)


def test_pareto_front_is_marked_in_multi_objective_studies() -> None:
    study = optuna.create_study(directions=["minimize", "minimize"], study_name="pareto")
    study.set_metric_names(["eval_loss", "peak_memory_mb"])
    dists = {"lora.r": IntDistribution(4, 64, log=True)}
    for r, values in ((8, [2.0, 300.0]), (32, [1.5, 900.0]), (16, [2.5, 950.0])):
        add(study, TrialState.COMPLETE, 1.0, {"lora.r": r}, dists, values)
    table = report_table(study, color=False)
    assert header(table)[:5] == ["#", "state", "eval_loss", "peak_memory_mb", "r"]
    assert [n for n, line in rows(table).items() if line.startswith(MARK)] == [0, 1]
    assert table.splitlines()[-1] == f"{MARK} Pareto front: #0, #1"
    assert rows(table)[1].split()[3:5] == ["1.5", "900"]


def test_conditional_parameters_of_one_path_share_a_column() -> None:
    """adamw.lr and sgd.lr both set optimizer.lr: one lr column, whatever the optimizer."""
    from sweeper.space import parse_space
    from sweeper.study import space_fingerprint

    params = parse_space({
        "optimizer.name": "choice(adamw, sgd)",
        "adamw.lr": {"path": "optimizer.lr", "type": "float", "low": 1e-5, "high": 1e-3, "log": True,
                     "when": {"optimizer.name": "adamw"}},
        "sgd.lr": {"path": "optimizer.lr", "type": "float", "low": 1e-3, "high": 1e-1, "log": True,
                   "when": {"optimizer.name": "sgd"}},
    })
    study = optuna.create_study(study_name="conditional")
    study.set_user_attr("search_space", space_fingerprint(params))
    dists = {p.name: p.distribution for p in params}
    add(study, TrialState.COMPLETE, 1.0, {"optimizer.name": "adamw", "adamw.lr": 1.2e-5},
        {k: dists[k] for k in ("optimizer.name", "adamw.lr")}, [1.0])
    add(study, TrialState.COMPLETE, 1.0, {"optimizer.name": "sgd", "sgd.lr": 0.09},
        {k: dists[k] for k in ("optimizer.name", "sgd.lr")}, [2.0])
    table = report_table(study, color=False)
    assert header(table) == ["#", "state", "value", "lr", "optimizer", "duration"]
    assert rows(table)[0].split()[4:6] == ["1.2e-05", "adamw"]
    assert rows(table)[1].split()[2:5] == ["2", "0.09", "sgd"]


OPTIMIZER = CategoricalDistribution(["adamw", "sgd"])


def test_the_optimizer_keeps_its_column_when_it_varies() -> None:
    """Three parameters vary more than the optimizer (one SGD trial in six), yet AdamW vs SGD stays in view."""
    study = optuna.create_study(study_name="optimizers")
    dists = {"lora.r": R, "optimizer.lr": LR, "lora.dropout": DROPOUT, "optimizer.name": OPTIMIZER}
    for i in range(6):
        add(study, TrialState.COMPLETE, 1.0, {"lora.r": (8, 16)[i % 2], "optimizer.lr": 10 ** -(2 + i % 3),
                                              "lora.dropout": i / 50, "optimizer.name": "sgd" if i == 3 else "adamw"},
            dists, [1.0 + i / 10])
    assert header(report_table(study, color=False)) == [
        "#", "state", "value", "dropout", "lr", "r", "optimizer", "duration"]
    assert header(report_table(study, max_params=2, color=False)) == [
        "#", "state", "value", "dropout", "optimizer", "duration"]
    assert header(report_table(study, max_params=0, color=False)) == ["#", "state", "value", "duration"]

    same = optuna.create_study(study_name="adamw-only")
    for i in range(6):
        add(same, TrialState.COMPLETE, 1.0, {"optimizer.lr": 10 ** -(2 + i % 3), "lora.dropout": i / 50,
                                             "optimizer.name": "adamw"},
            {k: v for k, v in dists.items() if k != "lora.r"}, [1.0 + i / 10])
    assert header(report_table(same, max_params=2, color=False)) == ["#", "state", "value", "dropout", "lr", "duration"]


def importance_study(n: int) -> optuna.Study:
    """The value follows ``x`` alone; ``y`` covers its whole range, ``x`` only the middle fifth of its own."""
    study = optuna.create_study(study_name="importance")
    dists = {"x": FloatDistribution(0.0, 1.0), "y": FloatDistribution(0.0, 1.0)}
    for i in range(n):
        x, y = 0.4 + 0.2 * i / (n - 1), (7 * i % n) / (n - 1)
        add(study, TrialState.COMPLETE, 1.0, {"x": x, "y": y}, dists, [10 * x])
    return study


def test_a_more_important_parameter_comes_before_a_more_varying_one() -> None:
    study = importance_study(MIN_TRIALS_FOR_IMPORTANCE + 4)
    rows = [sampled_values(t, {}) for t in study.trials]
    assert key_params(rows, 2) == ["y", "x"]  # by variance alone, y first
    importance = param_importances(study, {})
    assert importance["x"] > importance["y"]
    assert header(report_table(study, color=False)) == ["#", "state", "value", "x", "y", "duration"]


def test_too_few_trials_or_one_value_fall_back_to_variance() -> None:
    assert param_importances(importance_study(MIN_TRIALS_FOR_IMPORTANCE - 1), {}) == {}
    assert header(report_table(importance_study(8), color=False)) == ["#", "state", "value", "y", "x", "duration"]
    flat = optuna.create_study(study_name="flat")
    dists = {"x": FloatDistribution(0.0, 1.0)}
    for i in range(MIN_TRIALS_FOR_IMPORTANCE + 1):
        add(flat, TrialState.COMPLETE, 1.0, {"x": i / 100}, dists, [2.0])
    assert param_importances(flat, {}) == {}


def test_trial_line_says_number_state_value_params_and_time() -> None:
    study = optuna.create_study(study_name="lines")
    dists = {"lora.r": R, "lora.dropout": DROPOUT, "optimizer.name": OPTIMIZER, "optimizer.lr": LR}
    add(study, TrialState.COMPLETE, 12.5, {"lora.r": 8, "lora.dropout": 0.05, "optimizer.name": "adamw",
                                           "optimizer.lr": 1e-4}, dists, [2.5])
    add(study, TrialState.PRUNED, 3.0, {"lora.r": 16, "lora.dropout": 0.05, "optimizer.name": "adamw",
                                        "optimizer.lr": 3e-3}, dists, reason="pruned at step 1: eval_loss 3.2000")
    first, second = study.trials
    # The first trial: nothing varies yet; the space's order, and the optimizer, which the space searches.
    assert trial_line(study, first, max_params=2) == "trial 0 complete  value 2.5  r=8 optimizer=adamw  12.5s"
    assert trial_line(study, second, max_params=3) == (
        "trial 1 pruned  r=16 lr=0.003 optimizer=adamw  3.0s  pruned at step 1: eval_loss 3.2000")


def test_short_names_stay_unambiguous() -> None:
    assert short_names(["lora.r", "optimizer.name", "a.lr", "b.lr"]) == {
        "lora.r": "r", "optimizer.name": "optimizer", "a.lr": "a.lr", "b.lr": "b.lr"}


@pytest.mark.parametrize(("drawn", "expected"), [
    ([(1e-5, LR), (1e-2, LR)], 1.0),               # the two ends of a log range
    ([(1e-3, LR), (1e-3, LR), (1e-3, LR)], 0.0),   # constant
    ([(8, R)], 0.0),                               # one value says nothing
    ([(8, R), (16, R), (8, R), (16, R)], 0.5),     # half the trials differ from the most common value
])
def test_spread(drawn: list[tuple[Any, Any]], expected: float) -> None:
    assert spread(drawn) == pytest.approx(expected)


def test_studies_without_a_completed_trial() -> None:
    empty = optuna.create_study(study_name="empty")
    assert report_table(empty, color=False) == "study empty: no trials yet"
    add(empty, TrialState.FAIL, 0.1, {}, {}, reason="ValueError: boom")
    table = report_table(empty, color=False)
    assert table.splitlines()[-1] == "no completed trial yet"
    assert MARK not in table
    assert rows(table)[0].endswith("ValueError: boom")


def test_ask_tell_study_loaded_like_the_cli_does(tmp_path: Path) -> None:
    """A study in a sweep's store, read back through load_study(cfg) as `sweeper report` does."""
    from sweeper import compose
    from sweeper.study import load_study

    cfg, _ = compose.load([f"output_dir={tmp_path}", "study.name=asked"])
    study = optuna.create_study(study_name="asked", storage=cfg.storage_url)
    for i, state in enumerate((TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.COMPLETE)):
        trial = study.ask({"optimizer.lr": LR})
        assert trial.params["optimizer.lr"] > 0
        if state == TrialState.PRUNED:
            trial.report(4.0, 1)
            trial.set_user_attr("state_reason", "pruned at step 1: eval_loss 4.0000")
        if state == TrialState.FAIL:
            trial.set_user_attr("state_reason", "RuntimeError: boom")
        study.tell(trial, 3.0 - i / 10 if state == TrialState.COMPLETE else None, state=state)
    table = report_table(load_study(cfg), color=False)
    assert table.splitlines()[0].endswith("4 trials: 2 complete, 1 pruned, 1 failed")
    assert [n for n, line in rows(table).items() if line.startswith(MARK)] == [3]
    assert "pruned at step 1: eval_loss 4.0000" in rows(table)[1]
    assert rows(table)[2].endswith("RuntimeError: boom")


def test_report_verb_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sweeper.cli import main

    study = optuna.create_study(study_name="qlora-default", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    add(study, TrialState.COMPLETE, 2.0, {"lora.r": 8}, {"lora.r": R}, [1.25])
    assert main(["report", f"output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "study qlora-default (minimize value): 1 trial: 1 complete" in out
    assert f"{MARK} best trial: #0 (value 1.25)" in out
    assert main(["report", f"output_dir={tmp_path / 'missing'}"]) == 2
    assert "no study store" in capsys.readouterr().err
