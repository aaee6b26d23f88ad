"""Benchmark 3's arithmetic: a study's cost to the target, medians over seeds that may be only bounds, and
random search's cost estimated from all its trials pooled. Pure: scipy is imported inside ``pooled_estimate``."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from bench.report import num
from bench.timing import TrialTiming, best_value

TOLERANCE = 0.01


@dataclass
class StudyRun:
    strategy: str
    seed: int
    trials: list[TrialTiming]
    capped: bool

    @property
    def gpu_s(self) -> float:
        return sum(t.end - t.start for t in self.trials)

    @property
    def best(self) -> float | None:
        return best_value(self.trials)


def target(runs: Sequence[StudyRun]) -> float | None:
    """The best eval loss any study reached, plus the tolerance."""
    bests = [r.best for r in runs if r.best is not None]
    return min(bests) * (1 + TOLERANCE) if bests else None


@dataclass(frozen=True)
class Median:
    """A median cost to target over studies; ``exact`` False: the median study never reached the target, and
    ``value`` is a lower bound (what that study spent without reaching it)."""

    value: float
    exact: bool

    def __str__(self) -> str:
        digits = 1 if self.value < 1e4 else 0
        return num(self.value, digits) if self.exact else f"not reached (> {num(self.value, digits)})"


def median_to_target(to_target: Sequence[float | None], spent: Sequence[float]) -> Median | None:
    """Median of the costs to target, a study that never reached it counting as infinitely long."""
    if not to_target:
        return None
    exact = statistics.median([math.inf if t is None else t for t in to_target])
    if not math.isinf(exact):
        return Median(exact, True)
    # Such a study's cost to target is more than it spent: the median of those bounds bounds the median.
    bounds = [s if t is None else t for t, s in zip(to_target, spent, strict=True)]
    return Median(statistics.median(bounds), False)


def ratio(ours: Median | None, baseline: Median | None) -> str:
    """ours / baseline, or an upper bound on it when the baseline's median study never reached the target."""
    if ours is None or baseline is None or not ours.exact:
        return "n/a (the median TPE + successive halving study did not reach the target)"
    if baseline.exact:
        return f"{ours.value / baseline.value:.2f}"
    return f"< {ours.value / baseline.value:.2f} (the median random-search study did not reach the target)"


@dataclass(frozen=True)
class PooledEstimate:
    """Random search's median GPU time to target from all its trials pooled over seeds (95% interval)."""

    hits: int
    trials: int
    median_s: float
    low_s: float
    high_s: float


def pooled_estimate(trials: Sequence[TrialTiming], threshold: float) -> PooledEstimate | None:
    """Random search draws its trials independently, so a study's trials to the first hit are geometric in the
    share p of trials at or under the target: median ln 2 / -ln(1 - p) trials, times the mean trial time. p comes
    from every random-search trial of every seed, with an exact (Clopper-Pearson) 95% interval."""
    from scipy.stats import beta

    if not trials:
        return None
    n = len(trials)
    hits = sum(t.state == "COMPLETE" and t.value is not None and t.value <= threshold for t in trials)
    mean_s = statistics.fmean(t.end - t.start for t in trials)

    def median_s(p: float) -> float:
        return math.inf if p <= 0 else mean_s if p >= 1 else mean_s * max(1.0, math.log(2) / -math.log1p(-p))

    low_p = beta.ppf(0.025, hits, n - hits + 1) if hits else 0.0
    high_p = beta.ppf(0.975, hits + 1, n - hits) if hits < n else 1.0
    return PooledEstimate(hits, n, median_s(hits / n), median_s(high_p), median_s(low_p))


def steps_of(t: TrialTiming) -> float:
    return float(t.steps or 0)
