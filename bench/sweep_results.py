"""Benchmark 1's arithmetic: what one method did, and ours against a baseline on the trials both ran alike.

Pure: trial timings in, numbers out.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.timing import TrialTiming, assign_workers, best_value, overheads, steady_per_hour, trial_walls


@dataclass
class MethodResult:
    """What one method did: its trials and the times around them."""

    key: str
    trials: list[TrialTiming]
    began: float
    ended: float
    notes: list[str] = field(default_factory=list)
    workers: int = 1

    @property
    def best_loss(self) -> float | None:
        return best_value(self.trials)

    @property
    def lanes(self) -> list[list[TrialTiming]]:
        """The trials of each worker, in start order."""
        if self.workers == 1:
            return [sorted(self.trials, key=lambda t: t.start)]
        return assign_workers(self.trials, self.workers)

    @property
    def measured(self) -> list[TrialTiming]:
        """The trials after each worker's warm-up (first) trial."""
        return sorted((t for lane in self.lanes for t in lane[1:]), key=lambda t: t.start)

    @property
    def per_hour(self) -> float | None:
        """Steady completed trials per hour, summed over the workers."""
        rates = [r for r in map(steady_per_hour, self.lanes) if r is not None]
        return sum(rates) if rates else None

    @property
    def overheads(self) -> list[float]:
        return [o for lane in self.lanes for o in overheads(lane)[1:]]

    @property
    def window(self) -> tuple[float, float] | None:
        m = self.measured
        return (m[0].start, max(t.end for t in m)) if m else None


def median_busy(r: MethodResult) -> float | None:
    busy = [t.busy for t in r.measured if t.busy is not None]
    return statistics.median(busy) if busy else None


def params_key(t: TrialTiming) -> str:
    """A trial's sampled parameters as a key: the same in every method that sampled them."""
    return json.dumps(t.params, sort_keys=True)


def measured_walls(r: MethodResult) -> dict[str, tuple[float, float]]:
    """(wall, train+eval) seconds of each measured complete trial, keyed by its sampled parameters."""
    return {params_key(t): (wall, t.busy)
            for lane in r.lanes for t, wall in list(zip(lane, trial_walls(lane), strict=True))[1:]
            if t.state == "COMPLETE" and t.busy is not None}


def paired_speedup(r: MethodResult, reference: MethodResult,
                   reference_trial_s: float | None = None) -> tuple[int, float] | None:
    """(pairs, r's trials per hour over the reference's) on the measured trials both ran with the same
    parameters, so a different mix of trials cannot tilt it. With ``reference_trial_s``, each pair's training
    and evaluation is scaled by the factor that makes the reference's take that long; overheads stay as
    measured. None for several workers (their walls overlap) or without a pair."""
    mine, theirs = measured_walls(r), measured_walls(reference)
    pairs = [(mine[k], theirs[k]) for k in mine if k in theirs]
    if r.workers > 1 or reference.workers > 1 or not pairs:
        return None
    if reference_trial_s is None:
        return len(pairs), sum(w for _, (w, _) in pairs) / sum(w for (w, _), _ in pairs)
    scaled = [(busy * reference_trial_s / ref_busy + wall - busy, reference_trial_s + ref_wall - ref_busy)
              for (wall, busy), (ref_wall, ref_busy) in pairs]
    return len(pairs), sum(ref for _, ref in scaled) / sum(mine for mine, _ in scaled)


def best_of_first(trials: Sequence[TrialTiming], k: int) -> float | None:
    """The best complete value among the first ``k`` trials the sampler asked for (by trial number)."""
    return best_value(sorted(trials, key=lambda t: t.number)[:k])


def paired_differences(ours: Sequence[TrialTiming], theirs: Sequence[TrialTiming]) -> list[float]:
    """ours - theirs for every pair of complete trials with the same sampled parameters."""
    def complete(trials: Sequence[TrialTiming]) -> dict[str, float]:
        return {params_key(t): t.value for t in trials
                if t.state == "COMPLETE" and t.value is not None}

    mine, other = complete(ours), complete(theirs)
    return [mine[k] - other[k] for k in mine if k in other]
