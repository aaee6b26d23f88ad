"""A study as a terminal table: one row per trial, the best trial (or the Pareto front) marked.

Example (``python -m sweeper report`` prints this for a sweep's study):
    >>> print(report_table(study, color=False))  # doctest: +SKIP
    study qlora-default (minimize eval_loss): 3 trials: 1 complete, 1 pruned, 1 failed
       #  state     eval_loss       lr   r  duration  reason
    -  -  --------  ---------  -------  --  --------  ------------------------------------------
    *  0  complete    10.8104  0.00015   8     12.1s
       1  pruned            -    0.002  16      4.0s  pruned at step 1: eval_loss 10.8115
       2  failed            -   0.0001  16      0.1s  ConfigError: lora.targets: 'bogus_proj' ...
    * best trial: #0 (eval_loss 10.8104)
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.importance import PedAnovaImportanceEvaluator
from optuna.trial import FrozenTrial, TrialState

from sweeper.records import StudyRecord, TrialRecord
from sweeper.study import stored_space

log = logging.getLogger(__name__)

MARK = "*"
MISSING = "-"
MAX_CELL = 14
"""Widest parameter cell; longer values (explicit module lists) are cut."""
LINE_WINDOW = 200
"""A trial's line ranks the parameters over this many of the latest finished trials: a sweep in slots ends several
trials a second, and the ranking's cost over all of them grew with the study (listing them still does)."""
MAX_REASON = 80
"""Widest reason; the reason is the last column, so it can be long without breaking alignment."""

BOLD_GREEN = "\033[1;32m"
YELLOW = "\033[33m"
RED = "\033[31m"
BOLD = "\033[1m"
RESET = "\033[0m"

STATE_NAMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
               TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
STATE_COLORS = {TrialState.PRUNED: YELLOW, TrialState.FAIL: RED}
STATE_COLUMN = 2
"""Index of the state cell in a row: marker, number, state, ..."""
OPTIMIZER = "optimizer.name"
"""AdamW or SGD is the question a sweep over optimizers asks: its column stays whenever it varies."""
MIN_TRIALS_FOR_IMPORTANCE = 20
"""Below this many completed trials, importances swing from one trial to the next: variance decides instead."""
TOP_TRIALS = 5
"""Completed trials at least in the top group that importance compares with the rest (PED-ANOVA's target)."""


def use_color(stream: TextIO | None = None) -> bool:
    """ANSI colors only on a terminal, and never when ``NO_COLOR`` is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    stream = stream if stream is not None else sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


def objective_names(study: optuna.Study) -> list[str]:
    """Names of the study's values: Optuna's metric names, else the sweep's objectives, else value/valueN."""
    n = len(study.directions)
    for names in (study.metric_names, StudyRecord.of(study).objectives):
        if names and len(names) == n:
            return [str(x) for x in names]
    return ["value"] if n == 1 else [f"value{i}" for i in range(n)]


def marked_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial of a single-objective study, or the Pareto front of a multi-objective one."""
    if len(study.directions) > 1:
        return list(study.best_trials)
    try:
        return [study.best_trial]
    except ValueError:  # no completed trial yet
        return []


def param_paths(study: optuna.Study) -> dict[str, str]:
    """Optuna parameter name -> the config path it sets, from the search space stored on the study.

    Conditional parameters such as ``adamw.lr`` and ``sgd.lr`` both set ``optimizer.lr``; reading
    them as one column keeps the learning rate in view whatever the optimizer. Studies made outside
    the sweeper have no stored space: each name is its own path.
    """
    return {p.name: p.path for p in stored_space(study)}


def sampled_values(trial: FrozenTrial, paths: Mapping[str, str]) -> dict[str, tuple[Any, BaseDistribution | None]]:
    """A trial's sampled values by config path, each with the distribution it was drawn from."""
    return {paths.get(n, n): (v, trial.distributions.get(n)) for n, v in trial.params.items()}


def _unit(value: float, dist: FloatDistribution | IntDistribution) -> float:
    low, high = float(dist.low), float(dist.high)
    if dist.log:
        low, high, value = math.log(low), math.log(high), math.log(value)
    return (value - low) / (high - low) if high > low else 0.0


def spread(drawn: Sequence[tuple[Any, BaseDistribution | None]]) -> float:
    """How much a parameter varies, in [0, 1]: comparable across numeric and categorical parameters.

    Numeric values are placed on their distribution's range (log-scaled where the distribution is),
    and twice their standard deviation is taken (0.5 is the largest standard deviation in [0, 1]).
    Categorical values score the share of trials that differ from the most common value.
    """
    if len(drawn) < 2:
        return 0.0
    if all(isinstance(d, (FloatDistribution, IntDistribution)) for _, d in drawn):
        units = [_unit(float(v), d) for v, d in drawn]  # type: ignore[arg-type]
        return min(1.0, 2 * statistics.pstdev(units))
    counts: dict[str, int] = {}
    for v, _ in drawn:
        counts[repr(v)] = counts.get(repr(v), 0) + 1
    return 1.0 - max(counts.values()) / len(drawn)


def param_importances(study: optuna.Study, paths: Mapping[str, str]) -> dict[str, float]:
    """Config path -> Optuna's importance of its parameters for the objective(s); empty where it says nothing.

    PED-ANOVA (Optuna's evaluator for conditional spaces) compares the best completed trials with all of
    them. With few trials or a single objective value it returns noise or zeros, so the study needs
    :data:`MIN_TRIALS_FOR_IMPORTANCE` completed trials with at least two distinct values, and the top group at
    least :data:`TOP_TRIALS` of them. Parameters of one path (``adamw.lr`` and ``sgd.lr``) add up.
    """
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.values and all(math.isfinite(v) for v in t.values)]
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE or len({tuple(t.values) for t in complete}) < 2:
        return {}
    evaluator = PedAnovaImportanceEvaluator(target_quantile=max(0.1, TOP_TRIALS / len(complete)))
    try:
        with warnings.catch_warnings():  # small-regime and experimental-argument warnings: the guard above covers them
            warnings.simplefilter("ignore")
            by_name = optuna.importance.get_param_importances(study, evaluator=evaluator, normalize=False)
    except Exception as e:  # a table without importances beats no table
        log.debug("parameter importance not available: %s", e)
        return {}
    by_path: dict[str, float] = {}
    for name, value in by_name.items():
        by_path[paths.get(name, name)] = by_path.get(paths.get(name, name), 0.0) + value
    if not by_path or not all(math.isfinite(v) for v in by_path.values()) or sum(by_path.values()) <= 0:
        return {}
    return by_path


def key_params(rows: Sequence[Mapping[str, tuple[Any, BaseDistribution | None]]], max_params: int,
               importance: Mapping[str, float] | None = None, pinned: Sequence[str] = ()) -> list[str]:
    """The parameters (config paths) that matter most, at most ``max_params``.

    ``rows`` holds each trial's :func:`sampled_values`. Parameters are ranked by ``importance`` where given
    (:func:`param_importances`), then by how much they vary: a conditional parameter's spread is weighted by the
    share of trials that sampled it, so one seen in one trial out of ten does not push out one that every trial
    sampled. Ties keep the sampling order (the search space's order). A ``pinned`` path that some trial sampled
    takes the last place when the ranking would leave it out.
    """
    order = list(dict.fromkeys(path for row in rows for path in row))
    total = max(1, sum(1 for row in rows if row))
    importance = importance or {}

    def score(path: str) -> tuple[float, float]:
        drawn = [row[path] for row in rows if path in row]
        return importance.get(path, 0.0), spread(drawn) * len(drawn) / total

    if max_params <= 0:
        return []
    chosen = sorted(order, key=score, reverse=True)[:max_params]
    for path in pinned:
        if path in order and path not in chosen:
            chosen = [*chosen[:max_params - 1], path]
    return chosen


def varies(rows: Sequence[Mapping[str, tuple[Any, BaseDistribution | None]]], path: str) -> bool:
    return spread([row[path] for row in rows if path in row]) > 0


def short_names(names: Sequence[str]) -> dict[str, str]:
    """``optimizer.warmup_ratio`` -> ``warmup_ratio``; full names where two would read alike.

    A bare ``name`` says nothing, so ``optimizer.name`` becomes ``optimizer``.
    """
    def short(name: str) -> str:
        parts = name.split(".")
        return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]

    shorts = [short(n) for n in names]
    return {n: (s if shorts.count(s) == 1 else n) for n, s in zip(names, shorts, strict=True)}


def fmt_number(v: Any, digits: int) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def fmt_duration(trial: FrozenTrial) -> str:
    """Wall time from start to completion: 12.3s, 4m05s, 1h02m; a dash while unfinished."""
    if trial.datetime_start is None or trial.datetime_complete is None:
        return MISSING
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def fmt_reason(trial: FrozenTrial) -> str:
    """Why a trial was pruned or failed (first line of ``state_reason``); empty for the others."""
    if trial.state not in (TrialState.PRUNED, TrialState.FAIL):
        return ""
    reason = str(TrialRecord.of(trial).state_reason or "").strip()
    return _cut(reason.splitlines()[0], MAX_REASON) if reason else MISSING


@dataclass(frozen=True)
class Column:
    """One column: header, right alignment (numbers) or left (text)."""

    header: str
    right: bool = False


def _row(trial: FrozenTrial, sampled: Mapping[str, tuple[Any, Any]], n_values: int, params: Sequence[str],
         marked: bool, with_reason: bool, with_job: bool = False) -> list[str]:
    complete = trial.state == TrialState.COMPLETE and trial.values is not None
    values = [fmt_number(v, 6) for v in trial.values] if complete else [MISSING] * n_values
    cells = [MARK if marked else "", str(trial.number), STATE_NAMES.get(trial.state, trial.state.name.lower()),
             *values,
             *(_cut(fmt_number(sampled[p][0], 3), MAX_CELL) if p in sampled else MISSING for p in params),
             fmt_duration(trial)]
    cells += [TrialRecord.of(trial).slurm_job or MISSING] if with_job else []
    return cells + [fmt_reason(trial)] if with_reason else cells


def _pad(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> list[list[str]]:
    """Header and rows with every cell padded to its column's width."""
    table = [[c.header for c in columns], *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return [[c.rjust(w) if col.right else c.ljust(w) for c, w, col in zip(r, widths, columns, strict=True)]
            for r in table]


def _join(cells: Sequence[str]) -> str:
    return "  ".join(cells).rstrip()


def _paint(text: str, code: str | None, color: bool) -> str:
    return f"{code}{text}{RESET}" if color and code else text


def _title(study: optuna.Study, trials: Sequence[FrozenTrial], names: Sequence[str]) -> str:
    goals = ", ".join(f"{d.name.lower()} {n}" for d, n in zip(study.directions, names, strict=True))
    counts = {word: sum(t.state == state for t in trials) for state, word in STATE_NAMES.items()}
    text = ", ".join(f"{n} {word}" for word, n in counts.items() if n)
    return f"study {study.study_name} ({goals}): {len(trials)} trial{'s' if len(trials) > 1 else ''}: {text}"


def _legend(study: optuna.Study, marked: Sequence[FrozenTrial], names: Sequence[str]) -> str:
    if not marked:
        return "no completed trial yet"
    if len(study.directions) > 1:
        return f"{MARK} Pareto front: " + ", ".join(f"#{t.number}" for t in marked)
    best = marked[0]
    return f"{MARK} best trial: #{best.number} ({names[0]} {fmt_number(best.value, 6)})"


def finished_rows(trials: Sequence[FrozenTrial],
                  sampled: Sequence[Mapping[str, tuple[Any, BaseDistribution | None]]]) -> list[Mapping[str, Any]]:
    """The sampled values of the finished trials; of all trials while none has finished.

    A running trial has sampled only part of its parameters: counting it would make a parameter look
    conditional that is not.
    """
    done = [row for t, row in zip(trials, sampled, strict=True) if t.state.is_finished()]
    return done or list(sampled)


def table_params(study: optuna.Study, trials: Sequence[FrozenTrial],
                 sampled: Sequence[Mapping[str, tuple[Any, BaseDistribution | None]]], paths: Mapping[str, str],
                 max_params: int) -> list[str]:
    """The report's parameter columns: by Optuna's importance where the study has enough completed trials
    (:func:`param_importances`), else by how much each parameter varies over the finished trials, with the
    optimizer's name whenever it varies."""
    rows = finished_rows(trials, sampled)
    importance = param_importances(study, paths) if max_params > 0 else {}
    return key_params(rows, max_params, importance, pinned=[OPTIMIZER] if varies(rows, OPTIMIZER) else [])


def trial_line(study: optuna.Study, trial: FrozenTrial, max_params: int = 4) -> str:
    """One finished trial in one line, for the terminal while a sweep runs.

    Example: ``trial 3 complete  eval_loss 10.8018  r=16 lr=0.00152 optimizer=adamw  13.4s``. The
    parameters are those that vary most over the latest ``LINE_WINDOW`` finished trials (variance only: importance is
    worth its cost in a report, not after every trial), with the optimizer's name whenever the trial
    sampled it; a pruned or failed trial ends with its reason.
    """
    names = objective_names(study)
    paths = param_paths(study)
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.number != trial.number]
    trials = trials[-LINE_WINDOW:]
    rows = [sampled_values(t, paths) for t in [*trials, trial]]
    mine = rows[-1]
    params = [p for p in key_params(rows, len({p for row in rows for p in row})) if p in mine][:max(0, max_params)]
    if OPTIMIZER in mine and not _single(mine[OPTIMIZER][1]) and OPTIMIZER not in params and params:
        params[-1] = OPTIMIZER
    shorts = short_names(params)
    parts = [f"trial {trial.number} {STATE_NAMES.get(trial.state, trial.state.name.lower())}"]
    if trial.state == TrialState.COMPLETE and trial.values is not None:
        parts.append(" ".join(f"{n} {fmt_number(v, 6)}" for n, v in zip(names, trial.values, strict=True)))
    if params:
        parts.append(" ".join(f"{shorts[p]}={_cut(fmt_number(mine[p][0], 3), MAX_CELL)}" for p in params))
    parts.append(fmt_duration(trial))
    reason = fmt_reason(trial)
    return "  ".join(parts + ([reason] if reason else []))


def _single(dist: BaseDistribution | None) -> bool:
    return dist is None or dist.single()


def report_table(study: optuna.Study, max_params: int = 6, color: bool | None = None) -> str:
    """The study's trials as an aligned text table, for a terminal.

    One row per trial, in trial order: number, state, the objective value(s), the ``max_params``
    sampled parameters that matter most (short names; see :func:`table_params`), wall time, the SLURM job
    that ran it (when a job array did), and why a trial was pruned or failed (its ``state_reason`` user
    attribute). The best trial (single objective) or every trial on the Pareto front (several objectives) is
    marked with ``*``, and bold green when colors are on.

    Args:
        study: any Optuna study; it is only read.
        max_params: parameter columns at most (0 for none).
        color: ANSI colors; None decides from stdout being a terminal and ``NO_COLOR``.

    Returns:
        The table, with a title line above and a legend below, without a trailing newline.
    """
    color = use_color() if color is None else color
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    if not trials:
        return f"study {study.study_name}: no trials yet"
    names = objective_names(study)
    marked = marked_trials(study)
    marked_numbers = {t.number for t in marked}
    paths = param_paths(study)
    sampled = [sampled_values(t, paths) for t in trials]
    params = table_params(study, trials, sampled, paths, max_params)
    shorts = short_names(params)
    numeric = {p for p in params
               if all(isinstance(row[p][0], (int, float)) and not isinstance(row[p][0], bool)
                      for row in sampled if p in row)}
    with_reason = any(t.state in (TrialState.PRUNED, TrialState.FAIL) for t in trials)
    with_job = any(TrialRecord.of(t).slurm_job for t in trials)  # which array task ran it, to find its log
    columns = [Column(" "), Column("#", right=True), Column("state"), *(Column(n, right=True) for n in names),
               *(Column(shorts[p], right=p in numeric) for p in params), Column("duration", right=True)]
    columns += [Column("slurm job")] if with_job else []
    columns += [Column("reason")] if with_reason else []
    rows = [_row(t, row, len(names), params, t.number in marked_numbers, with_reason, with_job)
            for t, row in zip(trials, sampled, strict=True)]
    header, *padded = _pad(columns, rows)
    body = []
    for t, cells in zip(trials, padded, strict=True):
        if t.number in marked_numbers:
            body.append(_paint(_join(cells), BOLD_GREEN, color))
        else:  # only the state word of a pruned or failed trial is colored: the row stays readable
            state = _paint(cells[STATE_COLUMN], STATE_COLORS.get(t.state), color)
            body.append(_join([*cells[:STATE_COLUMN], state, *cells[STATE_COLUMN + 1:]]))
    rule = "  ".join("-" * len(c) for c in header)
    return "\n".join([_title(study, trials, names), _paint(_join(header), BOLD, color), rule, *body,
                      _legend(study, marked, names)])
