"""The median pruner counts the trials alongside: tables for its pure parts, Optuna's decisions for one trial at a
time, and a first wave of trials running side by side pruned before any finishes, in any order of its checks and
through a reused read of the study."""

from __future__ import annotations

import datetime
import math
import random
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sweeper.config import to_schema
from sweeper.pruning import PeerPercentilePruner, checks_at, falls_behind, peer_values
from sweeper.samplers import make_pruner
from sweeper.study import ReusedReads


@pytest.mark.parametrize(("step", "reported", "warmup", "interval", "expected"), [
    (8, {8}, 0, 1, True),
    (16, {8, 16}, 0, 1, True),
    (3, {3}, 4, 1, False),           # inside the warm-up
    (4, {3, 4}, 4, 1, True),         # its first step
    (5, {4, 5}, 4, 2, False),        # between checks
    (6, {4, 6}, 4, 2, True),
    (7, {4, 7}, 4, 2, True),         # the check at 6 had no report: it moves to 7
    (7, {4, 6, 7}, 4, 2, False),     # ... unless 6 had one
])
def test_checks_at(step: int, reported: set[int], warmup: int, interval: int, expected: bool) -> None:
    assert checks_at(step, reported, warmup, interval) is expected


@pytest.mark.parametrize(("best", "peers", "values", "percentile", "n_startup", "minimize", "expected"), [
    (2.0, 3, [1.0, 3.0, 4.0], 50, 2, True, False),   # at or below the median stays
    (3.5, 3, [1.0, 3.0, 4.0], 50, 2, True, True),
    (3.5, 3, [1.0, 3.0, 4.0], 50, 4, True, False),   # too few peers
    (3.5, 5, [1.0, 3.0, 4.0], 50, 4, True, True),    # peers count whether or not they reported the step
    (0.5, 1, [1.0], 50, 0, True, False),             # one peer is enough with no start-up
    (2.0, 0, [], 50, 0, True, False),                # none is not
    (math.nan, 2, [], 50, 2, True, True),            # a NaN report prunes once there are peers ...
    (math.nan, 1, [1.0], 50, 2, True, False),        # ... and not before
    (2.5, 4, [1.0, 2.0, 3.0, 4.0], 25, 2, True, True),  # keep the best quarter
    (1.5, 4, [1.0, 2.0, 3.0, 4.0], 25, 2, True, False),
    (3.5, 3, [1.0, 3.0, 4.0], 50, 2, False, False),  # maximising: higher is better
    (2.0, 3, [1.0, 3.0, 4.0], 50, 2, False, True),
    (2.0, 2, [math.nan, math.nan], 50, 2, True, False),
    (9.0, 3, [], 50, 2, True, False),                # no peer reported the step
])
def test_falls_behind(best: float, peers: int, values: list[float], percentile: float, n_startup: int,
                      minimize: bool, expected: bool) -> None:
    assert falls_behind(best, peers, values, percentile, n_startup, minimize) is expected


T0 = datetime.datetime(2026, 1, 1)


def frozen(number: int, state: TrialState, values: dict[int, float], start: int = 0,
           end: int | None = None) -> optuna.trial.FrozenTrial:
    """A trial started ``start`` seconds after T0 and finished ``end`` seconds after it."""
    return optuna.trial.FrozenTrial(
        number=number, state=state, value=None, datetime_start=T0 + datetime.timedelta(seconds=start),
        datetime_complete=None if end is None else T0 + datetime.timedelta(seconds=end), params={},
        distributions={}, user_attrs={}, system_attrs={}, intermediate_values=values, trial_id=number)


def test_peers_are_the_finished_trials_and_those_alongside_that_reported_the_step() -> None:
    me = frozen(9, TrialState.RUNNING, {8: 5.0}, start=100)
    trials = [frozen(0, TrialState.COMPLETE, {8: 1.0, 16: 0.5}, end=50),
              frozen(1, TrialState.RUNNING, {8: 2.0}, start=90),
              frozen(2, TrialState.PRUNED, {8: 9.0}, start=0, end=60),      # pruned before this trial started
              frozen(3, TrialState.FAIL, {8: 9.0}, start=90, end=110),
              frozen(4, TrialState.PRUNED, {8: 3.0}, start=90, end=120),    # pruned at this step, alongside
              frozen(5, TrialState.PRUNED, {4: 3.0}, start=90, end=110),    # pruned at an earlier step
              frozen(6, TrialState.RUNNING, {}, start=95),
              frozen(7, TrialState.COMPLETE, {16: 0.7}, end=80),            # finished, without this step
              me]
    assert peer_values(trials, me, 8) == (4, [1.0, 2.0, 3.0])
    assert peer_values(trials, me, 16) == (2, [0.5, 0.7])


def curves(pruner: optuna.pruners.BasePruner, direction: str) -> list[tuple[TrialState, int | None]]:
    """A sequential study of noisy falling curves, some reporting every step and some every other one, with a NaN
    report here and there; each trial's end state and last step."""
    rng = random.Random(0)
    study = optuna.create_study(direction=direction, pruner=pruner)

    def objective(trial: optuna.Trial) -> float:
        level, every = rng.gauss(0, 1), rng.choice((1, 2))
        for step in range(0, 10, every):
            value = math.nan if rng.random() < 0.03 else level + rng.gauss(0, 0.3) - 0.05 * step
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return level

    study.optimize(objective, n_trials=40)
    return [(t.state, t.last_step) for t in study.trials]


@pytest.mark.parametrize(("percentile", "n_startup", "warmup", "interval", "direction"), [
    (50.0, 2, 0, 1, "minimize"), (50.0, 0, 2, 3, "minimize"), (25.0, 1, 1, 2, "minimize"),
    (50.0, 5, 0, 1, "maximize"),
])
def test_one_trial_at_a_time_prunes_as_optunas_pruner(percentile: float, n_startup: int, warmup: int,
                                                      interval: int, direction: str) -> None:
    # No trial alongside: every decision is Optuna's own, on the same reports.
    ours = curves(PeerPercentilePruner(percentile, n_startup, warmup, interval), direction)
    assert ours == curves(optuna.pruners.PercentilePruner(percentile, n_startup, warmup, interval), direction)
    assert any(state == TrialState.PRUNED for state, _ in ours)


def wave(storage: optuna.storages.BaseStorage, values: list[float], order: list[int]) -> list[bool]:
    """Trials started together report ``values`` at step 8, then check in ``order``, each pruned as it is judged;
    whether each was pruned, in trial order."""
    study = optuna.create_study(storage=storage, pruner=PeerPercentilePruner(50.0, 2, 0, 1))
    trials = [study.ask() for _ in values]
    for trial, value in zip(trials, values, strict=True):
        trial.report(value, 8)
    pruned = [False] * len(values)
    for i in order:
        if trials[i].should_prune():
            study.tell(trials[i], state=TrialState.PRUNED)
            pruned[i] = True
    return pruned


def test_a_first_wave_is_pruned_before_any_finishes_whatever_the_order_of_its_checks() -> None:
    # Optuna's median prunes none of the wave: nothing has finished. Ours prunes the worse half, in any order.
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    expected = [False] * 4 + [True] * 4
    assert wave(None, values, list(range(8))) == expected
    assert wave(None, values, list(reversed(range(8)))) == expected
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(2))
    trials = [study.ask() for _ in values]
    for trial, value in zip(trials, values, strict=True):
        trial.report(value, 8)
    assert not any(trial.should_prune() for trial in trials)


def test_a_reused_read_holds_this_processs_reports_at_once(tmp_path: Path) -> None:
    # A sweep in slots reuses reads of the study for a second; the wave's reports reach each pruner all the same.
    storage = ReusedReads(optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}"))
    storage.max_age_s = 60.0
    assert wave(storage, [4.0, 3.0, 2.0, 1.0], [0, 1, 2, 3]) == [True, True, False, False]


@pytest.mark.parametrize(("name", "percentile"), [("median", 50.0), ("percentile", 25.0)])
def test_the_configs_reach_the_pruner(name: str, percentile: float) -> None:
    cfg = to_schema({"study": {"pruner": {"name": name, "n_startup_trials": 3, "n_warmup_steps": 4,
                                          "interval_steps": 2}}})
    pruner = make_pruner(cfg.study.pruner, cfg.train)
    assert isinstance(pruner, PeerPercentilePruner)
    assert (pruner.percentile, pruner.n_startup_trials, pruner.n_warmup_steps, pruner.interval_steps) == (
        percentile, 3, 4, 2)


def test_bad_settings_are_refused_in_optunas_words() -> None:
    with pytest.raises(ValueError, match="Percentile must be between 0"):
        PeerPercentilePruner(120.0, 2, 0, 1)
