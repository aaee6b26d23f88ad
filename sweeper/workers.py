"""Several worker processes on one study: start one per GPU (or N on the CPU), watch, recycle, recover.

Workers coordinate only through Optuna's storage (RDB or journal file); this module just starts them on
this machine, shows one progress view, restarts a worker that asks to be recycled or that died, and
fails (then retries) the trial a dead worker left running. Workers on other machines join with
``python -m sweeper worker`` and the same overrides.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from sweeper.config import SweepConfig
from sweeper.launch import RECYCLE_EXIT, failed_trials, finish_parent, make_tracker, parent_run
from sweeper.space import Param
from sweeper.study import DeadTrialHandler, dead_on_this_host, fail_trials_of, finished_trials, open_study

log = logging.getLogger(__name__)

MAX_RESTARTS = 3  # per worker slot, for deaths (recycling does not count)


@dataclass
class Slot:
    """One worker position: its device, its process, how often it died."""

    index: int
    gpu: str | None
    proc: subprocess.Popen[bytes] | None = None
    deaths: int = 0

    @property
    def worker(self) -> str:
        return f"{socket.gethostname()}:{self.proc.pid}" if self.proc else ""


def visible_gpus() -> list[str]:
    """CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them."""
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no CUDA runtime means no GPUs
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [n.strip() for n in listed.split(",") if n.strip()] if listed else [str(i) for i in range(count)]
    return names[:count]


def gpu_slots(count: int, gpus: Sequence[str], per_gpu: int) -> list[str | None]:
    """The device of each worker: round-robin over the GPUs, at most ``per_gpu`` on each; None on the CPU."""
    if not gpus:
        return [None] * count
    return [gpus[i % len(gpus)] for i in range(min(count, len(gpus) * per_gpu))]


def worker_command(config_file: str | None) -> list[str]:
    # Overrides travel in the environment (SWEEPER_OVERRIDES), not argv, where `ps` would show passwords.
    cmd = [sys.executable, "-m", "sweeper", "worker", "--no-progress"]
    return cmd + (["--config", config_file] if config_file else [])


def log_tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join("    " + line for line in text[-lines:])


def launch_workers(cfg: SweepConfig, params: Sequence[Param], args: Sequence[str], config_file: str | None,
                   show_progress: bool = True) -> optuna.Study:
    """Create the study and its parent run, then run ``workers.count`` worker processes until the budget."""
    tracker = make_tracker(cfg)
    study = open_study(cfg, params, tracking_uri=cfg.tracking_uri)
    parent_id = parent_run(tracker, study, cfg, params)
    gpus = visible_gpus()
    slots = [Slot(i, gpu) for i, gpu in enumerate(gpu_slots(cfg.workers.count, gpus, cfg.workers.per_gpu))]
    count = len(slots)
    logs = cfg.output_path / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    handler = DeadTrialHandler(cfg.workers.max_retry, cfg.tracking_uri)
    fail_trials_of(study, dead_on_this_host, handler)  # left running by an earlier launch that was killed
    threads = max(1, (os.cpu_count() or 1) // count)
    print(f"{count} workers ({'GPUs ' + ','.join(s.gpu or '' for s in slots) if gpus else 'CPU'}); logs in {logs}")

    def start(slot: Slot) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SWEEPER_OVERRIDES": json.dumps(list(args)),
               "SWEEPER_WORKER_INDEX": str(slot.index), "SWEEPER_SUPERVISED": "1"}
        if slot.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot.gpu
        env.setdefault("OMP_NUM_THREADS", str(threads))
        with open(logs / f"worker-{slot.index}.log", "ab") as out:
            slot.proc = subprocess.Popen(worker_command(config_file), env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    for slot in slots:
        start(slot)
    bar = tqdm(total=cfg.study.n_trials, initial=finished_trials(study), desc=f"sweep {cfg.study.name}",
               unit="trial", disable=not show_progress)
    status = "FAILED"
    try:
        while any(s.proc is not None for s in slots):
            time.sleep(cfg.workers.poll_s)
            _show(bar, study)
            for slot in slots:
                if slot.proc is None or (rc := slot.proc.poll()) is None:
                    continue
                if rc == RECYCLE_EXIT:
                    log.info("worker %d recycled", slot.index)
                    start(slot)
                elif rc != 0:
                    slot.deaths += 1
                    lost = fail_trials_of(study, slot.worker.__eq__, handler)
                    log.warning("worker %d exited with %s; trials %s failed and enqueued again; its log ends:\n%s",
                                slot.index, rc, lost, log_tail(logs / f"worker-{slot.index}.log"))
                    done = finished_trials(study) >= cfg.study.n_trials
                    if slot.deaths <= MAX_RESTARTS and not done:
                        start(slot)
                    else:
                        slot.proc = None
                else:
                    slot.proc = None
        _show(bar, study)
        complete = finished_trials(study) >= cfg.study.n_trials
        status = "FINISHED" if complete else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _stop(slots)
        bar.close()
        finish_parent(tracker, parent_id, study, cfg, status)
    failed = failed_trials(study)
    if failed:
        print(f"{failed} trials failed; see {logs}")
    return study


def _stop(slots: Sequence[Slot]) -> None:
    """End every worker still running (the launcher is stopping): politely, then by force."""
    live = [s.proc for s in slots if s.proc is not None and s.proc.poll() is None]
    for proc in live:
        proc.terminate()
    for proc in live:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _show(bar: tqdm, study: optuna.Study) -> None:
    trials = study.get_trials(deepcopy=False)
    bar.n = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    postfix = {"running": sum(t.state == TrialState.RUNNING for t in trials)}
    if len(study.directions) == 1 and any(t.state == TrialState.COMPLETE for t in trials):
        postfix["best"] = f"{study.best_value:.4f}"  # type: ignore[assignment]
    bar.set_postfix(postfix, refresh=True)

