"""Trial timing as the benchmarks read it from a study: wall time, overhead, steady rate, workers, cost to target.

Pure arithmetic on epoch seconds; nothing here imports torch or Optuna.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sweeper.records import TrialRecord


@dataclass(frozen=True)
class TrialTiming:
    """One trial as the benchmarks see it; times are epoch seconds."""

    number: int
    start: float
    end: float
    state: str
    value: float | None = None
    busy: float | None = None
    """Seconds inside training and evaluation steps (None when the trial did not say)."""
    excluded: float = 0.0
    """Seconds the benchmark itself spent inside the trial (not charged to the method)."""
    worker: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    steps: int | None = None
    """Optimizer steps the trial trained: its last reported step (None when it reported none)."""
    checkpointing: bool | None = None
    """Whether the trial ran with gradient checkpointing (None when its config was not recorded)."""


def from_frozen(trial: Any, excluded: float = 0.0) -> TrialTiming:
    """An Optuna FrozenTrial -> TrialTiming (busy from the objective's ``train_seconds`` attribute)."""
    start = trial.datetime_start.timestamp() if trial.datetime_start else float("nan")
    end = trial.datetime_complete.timestamp() if trial.datetime_complete else start
    record = TrialRecord.of(trial)
    busy = record.train_seconds
    model = (record.config or {}).get("model", {})
    return TrialTiming(number=trial.number, start=start, end=end, state=trial.state.name, value=trial.value,
                       busy=float(busy) if busy is not None else None, excluded=excluded,
                       worker=record.worker or "", params=dict(trial.params),
                       steps=max(trial.intermediate_values, default=None),
                       checkpointing=model.get("gradient_checkpointing"))


def steps_per_hour(trials: Sequence[TrialTiming], start: float, seconds: float) -> float | None:
    """Trial steps per hour from ``start`` over ``seconds``, each trial's steps spread evenly over its own time.

    Unlike finished trials per hour, this does not swing with where a window cuts trials that start and end
    together (slots): a trial half inside the window counts half its steps."""
    total = 0.0
    for t in trials:
        if t.steps is None or t.end <= t.start:
            continue
        inside = min(t.end, start + seconds) - max(t.start, start)
        total += t.steps * max(0.0, inside) / (t.end - t.start)
    return total / seconds * 3600 if seconds > 0 and total > 0 else None


def finished_timings(study: Any) -> list[TrialTiming]:
    """The study's finished trials, less the surplus ones a budget guard dropped without running them."""
    return [from_frozen(t) for t in study.get_trials(deepcopy=False)
            if t.datetime_complete is not None and not TrialRecord.of(t).surplus]


def best_value(trials: Iterable[TrialTiming]) -> float | None:
    """The lowest value of a complete trial, or None."""
    return min((t.value for t in trials if t.state == "COMPLETE" and t.value is not None), default=None)


def trial_walls(trials: Sequence[TrialTiming]) -> list[float]:
    """Each trial's wall time: from its start to the next trial's start, so the work between trials is
    charged to the trial before it; the last one runs to its own end. Benchmark-only time is removed."""
    ordered = sorted(trials, key=lambda t: t.start)
    walls = [nxt.start - t.start for t, nxt in zip(ordered, ordered[1:], strict=False)]
    if ordered:
        walls.append(ordered[-1].end - ordered[-1].start)
    return [w - t.excluded for w, t in zip(walls, ordered, strict=True)]


def overheads(trials: Sequence[TrialTiming]) -> list[float]:
    """Wall time minus time in training and evaluation steps, per trial that reported its busy time."""
    ordered = sorted(trials, key=lambda t: t.start)
    return [w - t.busy for w, t in zip(trial_walls(ordered), ordered, strict=True) if t.busy is not None]


def steady_per_hour(trials: Sequence[TrialTiming]) -> float | None:
    """Completed trials per hour on one worker after its first (warm-up) trial: those after it, over the time
    from its end to the last trial's end."""
    ordered = sorted(trials, key=lambda t: t.start)
    if len(ordered) < 2:
        return None
    span = ordered[-1].end - ordered[0].end - sum(t.excluded for t in ordered[1:])
    done = sum(t.state == "COMPLETE" for t in ordered[1:])
    return done / span * 3600 if span > 0 else None


def assign_workers(trials: Sequence[TrialTiming], k: int) -> list[list[TrialTiming]]:
    """Split trials into ``k`` sequential workers: by their ``worker`` label, else by timing.

    Without labels, each trial goes to the free worker whose last trial ended most recently before it
    started (a worker starts its next trial right after the last), which recovers k sequential workers.
    """
    if trials and all(t.worker for t in trials):
        groups: dict[str, list[TrialTiming]] = {}
        for t in sorted(trials, key=lambda t: t.start):
            groups.setdefault(t.worker, []).append(t)
        return list(groups.values())
    lanes: list[list[TrialTiming]] = [[] for _ in range(k)]
    for t in sorted(trials, key=lambda t: t.start):
        free = [lane for lane in lanes if not lane or lane[-1].end <= t.start]
        pool = free or lanes
        lane = max(pool, key=lambda ln: ln[-1].end if ln else float("-inf"))
        lane.append(t)
    return [lane for lane in lanes if lane]


def time_to_target(trials: Sequence[TrialTiming], threshold: float,
                   cost: Callable[[TrialTiming], float] = lambda t: t.end - t.start) -> float | None:
    """Cost (by default GPU seconds: trial walls), summed in trial order until a complete trial's value is at or
    under ``threshold``."""
    spent = 0.0
    for t in sorted(trials, key=lambda t: t.number):
        spent += cost(t)
        if t.state == "COMPLETE" and t.value is not None and t.value <= threshold:
            return spent
    return None
