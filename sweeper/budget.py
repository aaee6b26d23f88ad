"""The study's budget: exact across workers, with the trials of dead workers failed and retried first."""

from __future__ import annotations

import threading
import time

import optuna
from optuna.trial import TrialState

from objectives.host_turns import PatientLock
from sweeper import interrupts
from sweeper.records import TrialRecord
from sweeper.study import FINISHED, DeadTrialHandler, dead_on_this_host, fail_trials_of, fresh_reads


class BudgetReached(Exception):
    """Trials ahead of this one already cover the study's budget."""


class BudgetGuard:
    """Keeps the study's total budget exact when several workers share it.

    Before a trial runs it counts the trials ahead of it (lower numbers) that finished or are running.
    If they cover the budget, the trial waits: should one of them fail, it runs in its place; once the
    budget is finished it is dropped (marked failed as surplus, never run).

    Optuna's ``MaxTrialsCallback`` stops a process's loop after one of its trials finishes, so N workers
    that each start a trial while the study is one short of its budget overshoot it by up to N-1 trials;
    this guard counts before a trial starts. Each process still stops with ``MaxTrialsCallback``.
    """

    def __init__(self, budget: int, poll_s: float, handler: DeadTrialHandler, timeout_s: float | None) -> None:
        self.budget = budget
        self.poll_s = poll_s
        self.handler = handler
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._lock = PatientLock()
        self._stopped = threading.Event()
        self._asking = 0
        """Threads let through to ask a trial that is not running yet."""

    def wait_turn(self, study: optuna.Study, number: int) -> bool:
        """True when trial ``number`` may run; False when the budget is finished (or the time is up) without it."""
        while True:
            with fresh_reads():
                trials = study.get_trials(deepcopy=False)
            if sum(t.state in FINISHED for t in trials) >= self.budget:
                return False
            ahead = sum(t.number < number and t.state in (*FINISHED, TrialState.RUNNING) for t in trials)
            if ahead < self.budget:
                return True
            if not self._pause(study):
                return False

    def hold_while_covered(self, study: optuna.Study) -> None:
        """Called after a trial of a sweep in slots ends, before the thread asks its next trial: while finished and
        running trials cover the budget, wait (one of them may fail, and then this thread asks its replacement);
        once the budget is finished, stop the study. A trial asked anyway would only be dropped as surplus."""
        while True:
            interrupts.check()
            if self._stopped.is_set():
                return
            # Threads whose trials ended in the same step must not all take the last turn.
            with self._lock, fresh_reads():
                trials = study.get_trials(deepcopy=False)
                finished = sum(t.state in FINISHED for t in trials)
                if finished >= self.budget:
                    study.stop()
                    return
                running = sum(t.state == TrialState.RUNNING for t in trials)
                if finished + running + self._asking < self.budget:
                    self._asking += 1
                    return
            if not self._pause(study):
                return

    def _pause(self, study: optuna.Study) -> bool:
        """One poll interval, failing the trials of dead workers first; False once the time is up."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            return False
        fail_dead_trials(study, self.handler)
        time.sleep(self.poll_s)
        return True

    def stop(self, study: optuna.Study) -> None:
        """Stop the study, and let every thread waiting in :meth:`hold_while_covered` go (to stop too)."""
        self._stopped.set()
        study.stop()

    def let_through(self, threads: int) -> None:
        """``threads`` threads are about to ask their first trials: count them until they have."""
        with self._lock:
            self._asking += threads

    def started(self) -> None:
        """A trial began (it counts as running from here): the turn :meth:`hold_while_covered` gave is taken."""
        with self._lock:
            self._asking = max(0, self._asking - 1)


def fail_dead_trials(study: optuna.Study, handler: DeadTrialHandler) -> None:
    """Fail, then retry, trials whose worker died: no heartbeat (RDB storages), or a gone process on this host."""
    optuna.storages.fail_stale_trials(study)
    fail_trials_of(study, dead_on_this_host, handler)


def failed_trials(study: optuna.Study) -> int:
    """Failed trials that ran (surplus trials the guard dropped are failed too, but never ran)."""
    return sum(not TrialRecord.of(t).surplus for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
