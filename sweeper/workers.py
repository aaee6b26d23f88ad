"""Several worker processes on one study: start one per GPU (or N on the CPU), watch, recycle, recover.

Workers coordinate only through Optuna's storage (RDB or journal file); this module just starts them on
this machine, shows one progress view, restarts a worker that asks to be recycled or that died, and
fails (then retries) the trial a dead worker left running. Workers on other machines join with
``python -m sweeper worker`` and the same overrides.

Each worker gets the launch's composed config, with its index and ``supervised`` set, as a file that only
the user can read: it holds the storage and tracking URLs with their passwords, which a command line
(``ps`` shows it to every user) or the environment (inherited by whatever a worker starts) would expose.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState
from tqdm.auto import tqdm

from sweeper import progress
from sweeper.budget import failed_trials
from sweeper.config import SweepConfig, to_container
from sweeper.launch import RECYCLE_EXIT, open_stores
from sweeper.space import Param
from sweeper.study import DeadTrialHandler, dead_on_this_host, fail_trials_of, finished_trials
from sweeper.tracking import finish_parent, parent_run

log = logging.getLogger(__name__)

MAX_RESTARTS = 3  # per worker slot, for deaths (recycling does not count)


class WorkersGaveUp(RuntimeError):
    """Workers died past their restarts before the budget was reached: the launch failed."""


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
    except Exception:  # no CUDA runtime means no GPUs
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [n.strip() for n in listed.split(",") if n.strip()] if listed else [str(i) for i in range(count)]
    return names[:count]


def gpu_slots(count: int, gpus: Sequence[str], per_gpu: int) -> list[str | None]:
    """The device of each worker: round-robin over the GPUs, at most ``per_gpu`` on each; None on the CPU."""
    if not gpus:
        return [None] * count
    return [gpus[i % len(gpus)] for i in range(min(count, len(gpus) * per_gpu))]


def write_worker_config(cfg: SweepConfig, index: int, folder: Path, supervised: bool = True) -> Path:
    """The launch's composed config as worker ``index`` runs it, in a file of mode 0600 under ``folder``.

    Nothing is redacted: the worker needs the storage's password. The search space is stored as the launch
    resolved it, so the worker's space and fixed settings are the launch's (``open_study`` compares them).
    ``supervised=False`` where no launcher outlives the workers (a scheduler runs them): the one that finishes the
    budget closes the study's parent run.
    """
    config = to_container(cfg)
    config["workers"].update(index=index, supervised=supervised)
    path = folder / f"worker-{index}.yaml"
    # mkstemp creates the file 0600 before anything is written; an older file of looser mode is replaced whole.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            yaml.safe_dump(config, out, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def worker_command(config_file: Path) -> list[str]:
    verbose = ["-v"] if progress.VERBOSE else []
    return [sys.executable, "-m", "sweeper", "worker", "--no-progress", *verbose, "--config", str(config_file)]


def log_tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join("    " + line for line in text[-lines:])


def engines_as_workers(cfg: SweepConfig, params: Sequence[Param],
                       model_config: Any) -> tuple[SweepConfig, list[str]]:
    """``cfg`` with the engines that ``workers.engines=auto`` takes for a launch in its own process on CUDA run as
    worker processes on that launch's GPU (:func:`sweeper.slots.as_workers`), and that GPU; else ``cfg`` and no
    GPUs. Decided before anything is loaded, from the model's config and the GPU's memory, as ``plan`` decides."""
    from sweeper.slots import as_workers, launches_as_workers, plan_slots

    if not launches_as_workers(cfg):
        return cfg, []
    import torch

    if not torch.cuda.is_available():
        return cfg, []
    from objectives.base import pick_device
    from objectives.decisions import device_memory_bytes
    from objectives.timing import detect_device

    device = pick_device(cfg.train.device)
    plan = plan_slots(cfg, params, "cuda", model_config, device_memory_bytes(device),
                      device=detect_device(cfg))
    workers = as_workers(cfg, plan)
    if workers is None:
        return cfg, []
    gpu = visible_gpus()[0]
    print(f"workers.engines=auto: {plan.engines} engines of {plan.slots} slots, each under a worker process of its own "
          f"on GPU {gpu} (workers.engines={plan.engines} keeps them under this process)")
    return workers, [gpu]


def launch_workers(cfg: SweepConfig, params: Sequence[Param], show_progress: bool = True,
                   gpus: Sequence[str] | None = None) -> optuna.Study:
    """Create the study and its parent run, then run ``workers.count`` worker processes until the budget, on
    ``gpus`` (default: the visible GPUs)."""
    tracker, study = open_stores(cfg, params)
    parent_id = parent_run(tracker, study, cfg, params)
    gpus = list(gpus) if gpus else visible_gpus()
    slots = [Slot(i, gpu) for i, gpu in enumerate(gpu_slots(cfg.workers.count, gpus, cfg.workers.per_gpu))]
    count = len(slots)
    logs = cfg.output_path / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    configs: list[Path] = []
    handler = DeadTrialHandler(cfg.workers.max_retry, cfg.tracking_uri)
    fail_trials_of(study, dead_on_this_host, handler)  # left running by an earlier launch that was killed
    threads = max(1, (os.cpu_count() or 1) // count)
    print(f"{count} workers ({'GPUs ' + ','.join(s.gpu or '' for s in slots) if gpus else 'CPU'}); logs in {logs}")

    def start(slot: Slot) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if slot.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot.gpu
        env.setdefault("OMP_NUM_THREADS", str(threads))
        with open(logs / f"worker-{slot.index}.log", "ab") as out:
            slot.proc = subprocess.Popen(worker_command(configs[slot.index]), env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    bar = tqdm(total=cfg.study.n_trials, initial=finished_trials(study), desc=f"sweep {cfg.study.name}",
               unit="trial", disable=not show_progress)
    status = "FAILED"
    try:
        configs.extend(write_worker_config(cfg, slot.index, logs) for slot in slots)
        for slot in slots:
            start(slot)
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
        fail_trials_of(study, dead_on_this_host, handler)  # a worker that had to be killed left its trial running
        for path in configs:  # no copy of the passwords outlives the launch
            path.unlink(missing_ok=True)
        bar.close()
        finish_parent(tracker, parent_id, study, cfg, status)
    failed = failed_trials(study)
    if failed:
        print(f"{failed} trials failed; see {logs}")
    gave_up = [s for s in slots if s.deaths > MAX_RESTARTS]
    if gave_up and status != "FINISHED":
        raise WorkersGaveUp(f"worker {gave_up[0].index} died {gave_up[0].deaths} times before the budget was "
                            f"reached; its log ends:\n{log_tail(logs / f'worker-{gave_up[0].index}.log')}")
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

