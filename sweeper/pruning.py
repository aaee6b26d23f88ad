"""Median and percentile pruning that counts the trials running alongside.

Optuna's percentile pruner compares a trial with finished trials only. A sweep that runs many trials at once
(``workers.slots``, worker processes) starts a whole wave of them before any finishes: none of that wave is ever
pruned, and its unpruned trials then hold the median lenient for the waves after it (on the 1B shape, 32 slots ran
16 steps per finished trial where one trial at a time ran 10). Here a trial's peers at a step are the finished
trials and the trials alongside it that reported the step: those still running, and those pruned at that very step
while it ran, so that a wave's decisions do not depend on the order in which its trials check. One trial at a time
has no trials alongside, so it decides as Optuna's pruner does.

Running peers are read as the study's storage serves them: a sweep in slots reuses a read of the study for up to a
second (:class:`sweeper.study.ReusedReads`), with this process's own reports written into it at once; another
worker's reports may be that old. A killed worker's trials count as running peers until they are failed.
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


def alongside(peer: FrozenTrial, trial: FrozenTrial, step: int) -> bool:
    """Whether ``peer`` reported ``step`` while ``trial`` ran: it still runs, or it was pruned at that step after
    ``trial`` started."""
    if peer.number == trial.number or step not in peer.intermediate_values:
        return False
    if peer.state == TrialState.RUNNING:
        return True
    return (peer.state == TrialState.PRUNED and peer.last_step == step and peer.datetime_complete is not None
            and trial.datetime_start is not None and peer.datetime_complete >= trial.datetime_start)


def peer_values(trials: Iterable[FrozenTrial], trial: FrozenTrial, step: int) -> tuple[int, list[float]]:
    """How many peers ``trial`` has at ``step`` (every finished trial, and those alongside it that reported the
    step), and the values of those that reported it."""
    count, values = 0, []
    for t in trials:
        if t.state == TrialState.COMPLETE or alongside(t, trial, step):
            count += 1
            if step in t.intermediate_values:
                values.append(t.intermediate_values[step])
    return count, values


def falls_behind(best: float, peers: int, values: list[float], percentile: float, n_startup: int,
                 minimize: bool) -> bool:
    """Whether a trial whose best report so far is ``best`` lies outside the best ``percentile`` percent of its
    peers' ``values`` at the step; never with fewer than ``n_startup`` peers (and at least one)."""
    if peers < max(n_startup, 1):
        return False
    if math.isnan(best):
        return True
    reported = [v for v in values if not math.isnan(v)]
    if not reported:
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
        states = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED)
        peers, values = peer_values(study.get_trials(deepcopy=False, states=states), trial, step)
        return falls_behind(best, peers, values, self.percentile, self.n_startup_trials, minimize)
