"""The median pruner counts running peers: tables for its pure parts, Optuna's decisions for one trial at a time,
and a first wave of trials running side by side pruned before any finishes."""

from __future__ import annotations

import math
import random

import optuna
import pytest
from optuna.trial import TrialState

from sweeper.pruning import PeerPercentilePruner, checks_at, falls_behind, peer_values


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


@pytest.mark.parametrize(("best", "peers", "percentile", "n_startup", "minimize", "expected"), [
    (2.0, [1.0, 3.0, 4.0], 50, 2, True, False),   # at or below the median stays
    (3.5, [1.0, 3.0, 4.0], 50, 2, True, True),
    (3.5, [1.0, 3.0, 4.0], 50, 4, True, False),   # too few peers
    (0.5, [1.0], 50, 0, True, False),             # one peer is enough with no start-up
    (2.0, [], 50, 0, True, False),                # none is not
    (math.nan, [], 50, 2, True, True),            # a NaN report prunes at once
    (2.5, [1.0, 2.0, 3.0, 4.0], 25, 2, True, True),  # keep the best quarter
    (1.5, [1.0, 2.0, 3.0, 4.0], 25, 2, True, False),
    (3.5, [1.0, 3.0, 4.0], 50, 2, False, False),  # maximising: higher is better
    (2.0, [1.0, 3.0, 4.0], 50, 2, False, True),
    (2.0, [math.nan, math.nan], 50, 2, True, False),
])
def test_falls_behind(best: float, peers: list[float], percentile: float, n_startup: int, minimize: bool,
                      expected: bool) -> None:
    assert falls_behind(best, peers, percentile, n_startup, minimize) is expected


def frozen(number: int, state: TrialState, values: dict[int, float]) -> optuna.trial.FrozenTrial:
    return optuna.trial.FrozenTrial(number=number, state=state, value=None, datetime_start=None,
                                    datetime_complete=None, params={}, distributions={}, user_attrs={},
                                    system_attrs={}, intermediate_values=values, trial_id=number)


def test_peers_are_the_finished_and_running_trials_that_reported_the_step() -> None:
    trials = [frozen(0, TrialState.COMPLETE, {8: 1.0, 16: 0.5}), frozen(1, TrialState.RUNNING, {8: 2.0}),
              frozen(2, TrialState.PRUNED, {8: 9.0}), frozen(3, TrialState.FAIL, {8: 9.0}),
              frozen(4, TrialState.RUNNING, {8: 3.0}), frozen(5, TrialState.RUNNING, {})]
    assert peer_values(trials, 4, 8) == [1.0, 2.0]
    assert peer_values(trials, 4, 16) == [0.5]


@pytest.mark.parametrize(("percentile", "warmup", "interval", "direction"), [
    (50.0, 0, 1, "minimize"), (50.0, 2, 3, "minimize"), (25.0, 1, 2, "minimize"), (50.0, 0, 1, "maximize"),
])
def test_one_trial_at_a_time_prunes_as_optunas_pruner(percentile: float, warmup: int, interval: int,
                                                      direction: str) -> None:
    # No running peers: every decision is Optuna's own, on the same reports.
    def curves(pruner: optuna.pruners.BasePruner) -> list[tuple[TrialState, int | None]]:
        rng = random.Random(0)
        study = optuna.create_study(direction=direction, pruner=pruner)

        def objective(trial: optuna.Trial) -> float:
            level = rng.gauss(0, 1)
            for step in range(10):
                value = level + rng.gauss(0, 0.3) - 0.05 * step
                trial.report(value, step)
                if trial.should_prune():
                    raise optuna.TrialPruned()
            return value

        study.optimize(objective, n_trials=40)
        return [(t.state, t.last_step) for t in study.trials]

    ours = curves(PeerPercentilePruner(percentile, 2, warmup, interval))
    assert ours == curves(optuna.pruners.PercentilePruner(percentile, 2, warmup, interval))
    assert any(state == TrialState.PRUNED for state, _ in ours)


def test_a_first_wave_running_side_by_side_is_pruned_before_any_finishes() -> None:
    # Four trials report step 8 together, none has finished: Optuna's median prunes none of them, ours the worst.
    study = optuna.create_study(pruner=PeerPercentilePruner(50.0, 2, 0, 1))
    trials = [study.ask() for _ in range(4)]
    for trial, value in zip(trials, (1.0, 2.0, 3.0, 4.0), strict=True):
        trial.report(value, 8)
    assert [trial.should_prune() for trial in trials] == [False, False, True, True]
    assert not any(optuna.pruners.MedianPruner(2).prune(study, study.trials[t.number]) for t in trials)


def test_bad_settings_are_refused_in_optunas_words() -> None:
    with pytest.raises(ValueError, match="Percentile must be between 0"):
        PeerPercentilePruner(120.0, 2, 0, 1)
