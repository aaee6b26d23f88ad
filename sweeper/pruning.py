"""Median and percentile pruning that counts the trials running alongside.

Optuna's percentile pruner compares a trial with finished trials only. A sweep that runs many trials at once
(``workers.slots``, worker processes) starts a whole wave of them before any finishes: none of that wave is ever
pruned, and its unpruned trials then hold the median lenient for the waves after it (on the 1B shape, 32 slots ran
16 steps per finished trial where one trial at a time ran 10). Here a trial's peers at a step are every other trial
that reported that step and has not been pruned: the finished ones and the running ones. One trial at a time has no
running peers, so it prunes as Optuna's pruner does.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState


def checks_at(step: int, reported: Collection[int], warmup: int, interval: int) -> bool:
    """Whether ``step`` is a check: past the warm-up, and the first report since the last multiple of
    ``interval`` (counted from ``warmup``); a check with no report at its step moves to the next report."""
    if step < warmup:
        return False
    last_check = (step - warmup) // interval * interval + warmup
    return not any(last_check <= s < step for s in reported)


def peer_values(trials: Iterable[FrozenTrial], number: int, step: int) -> list[float]:
    """The values at ``step`` of every trial but ``number`` that finished or still runs (neither pruned nor
    failed)."""
    alive = (TrialState.COMPLETE, TrialState.RUNNING)
    return [t.intermediate_values[step] for t in trials
            if t.number != number and t.state in alive and step in t.intermediate_values]


def falls_behind(best: float, peers: list[float], percentile: float, n_startup: int, minimize: bool) -> bool:
    """Whether a trial whose best report so far is ``best`` lies outside the best ``percentile`` percent of its
    peers' values at the step; never with fewer than ``n_startup`` peers (or one, if that is 0)."""
    if math.isnan(best):
        return True
    reported = [v for v in peers if not math.isnan(v)]
    if len(peers) < max(n_startup, 1) or not reported:
        return False
    cut = float(np.percentile(reported, percentile if minimize else 100 - percentile))
    return best > cut if minimize else best < cut


class PeerPercentilePruner(optuna.pruners.BasePruner):
    """Prune a trial whose best report so far is outside the best ``percentile`` percent of its peers' reports
    at its latest step (50: the median pruner)."""

    def __init__(self, percentile: float, n_startup_trials: int, n_warmup_steps: int, interval_steps: int) -> None:
        # Optuna's own pruner checks the same arguments and words its errors for them.
        optuna.pruners.PercentilePruner(percentile, n_startup_trials, n_warmup_steps, interval_steps)
        self.percentile = percentile
        self.n_startup_trials = n_startup_trials
        self.n_warmup_steps = n_warmup_steps
        self.interval_steps = interval_steps

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or not checks_at(step, trial.intermediate_values.keys(), self.n_warmup_steps,
                                         self.interval_steps):
            return False
        minimize = study.direction == StudyDirection.MINIMIZE
        reported = [v for v in trial.intermediate_values.values() if not math.isnan(v)]
        best = (min(reported) if minimize else max(reported)) if reported else math.nan
        peers = peer_values(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)),
                            trial.number, step)
        return falls_behind(best, peers, self.percentile, self.n_startup_trials, minimize)
