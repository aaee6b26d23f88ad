"""Benchmark 4: scaling from 1 to 2 workers (one per GPU) on one study with shared storage.

Each phase is a fresh study with the same trial budget. Its workers are separate ``python -m sweeper
launch`` processes with the same overrides, each pinned to one GPU with CUDA_VISIBLE_DEVICES; they share
the study through a PostgreSQL server started here on loopback (``--storage postgres``, the default; its
programs from a system install or ``--pg-bin``) or a journal or SQLite file, which keeps the budget the
study's total. The study and the MLflow store are created here first, so the workers only join.

Trials per hour count, per worker, the trials after its first (warm-up) one from that trial's end to its
last trial's end, summed over the workers; the end-to-end rate includes process start and model load.

    PYTHONPATH=$PWD python bench/scaling.py --out $R/scaling.md \\
        --model-source $M
    PYTHONPATH=$PWD python bench/scaling.py --out $R/scaling_smoke.md --cpu-smoke
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import REPO_ROOT, base_parser, command_line, environment, log_tail, make_workdir, quiet_logs
from bench.gpu import GpuSampler
from bench.models import model_label, model_overrides
from bench.postgres import find_bindir, loopback_server
from bench.report import markdown_table, num, percent, ratio, render_report, say, spread, write_report
from bench.timing import TrialTiming, assign_workers, finished_timings, steady_per_hour
from sweeper.workers import visible_gpus

GOAL = "2 workers on two GPUs sharing one PostgreSQL-backed study run at least 1.8x the trials per hour of 1"


@dataclass
class Phase:
    workers: int
    gpus: list[str]
    trials: list[TrialTiming] = field(default_factory=list)
    launched: float = 0.0
    ended: float = 0.0
    exit_codes: list[int] = field(default_factory=list)
    skipped: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def lanes(self) -> list[list[TrialTiming]]:
        return assign_workers(self.trials, self.workers)

    @property
    def steady(self) -> float | None:
        rates = [steady_per_hour(lane) for lane in self.lanes]
        return sum(r for r in rates if r is not None) if any(r is not None for r in rates) else None

    @property
    def end_to_end(self) -> float | None:
        done = [t for t in self.trials if t.state == "COMPLETE"]
        span = max((t.end for t in done), default=self.launched) - self.launched
        return len(done) / span * 3600 if done and span > 0 else None


SPACES = {"equal": ["search_space=none", "optimizer.lr=tag(log, interval(1e-5, 1e-3))"],
          "default": ["search_space=default"]}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__ or "")
    p.add_argument("--workers", default="1,2", help="worker counts to compare, one phase each")
    p.add_argument("--trials", type=int, default=20, help="the study budget of every phase")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per trial")
    p.add_argument("--batch", type=int, default=16, help="micro-batch size")
    p.add_argument("--weights", choices=["real", "random"], default="real")
    p.add_argument("--storage", choices=["postgres", "journal", "sqlite"], default="postgres",
                   help="shared study storage: a PostgreSQL server started for the run on 127.0.0.1 (default), "
                        "Optuna's journal file or an SQLite file")
    p.add_argument("--pg-bin", default=None,
                   help="folder with PostgreSQL's initdb and pg_ctl (default: the newest /usr/lib/postgresql/*/bin)")
    p.add_argument("--space", choices=sorted(SPACES), default="equal",
                   help="equal: only the learning rate is searched, so every trial does the same work and the "
                        "phases differ only in workers; default: the default search space (trial costs vary "
                        "with the sampled rank and targets)")
    p.add_argument("--worker-timeout", type=float, default=150.0,
                   help="each worker stops starting trials after this many seconds (keeps the run bounded)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.trials, args.steps, args.batch = 2, 2, 2
    return args


def phase_overrides(args: argparse.Namespace, workdir: Path, storage: str, workers: int) -> list[str]:
    out = [*model_overrides("tiny" if args.cpu_smoke else "135m", args.model_source, args.weights == "random"),
           *SPACES[args.space], f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
           f"train.micro_batch_size={args.batch}", "study/pruner=none", "study.sampler.constant_liar=true",
           f"study.name=scaling-{workers}w", f"study.n_trials={args.trials}", f"study.storage={storage}",
           f"study.timeout_s={args.worker_timeout}", f"output_dir={workdir}"]
    return out + (["data.max_length=64", "data.max_eval_examples=8"] if args.cpu_smoke else [])


STORAGE_LABELS = {"postgres": "one PostgreSQL server on 127.0.0.1 (started for the run)",
                  "journal": "Optuna's JournalStorage file backend", "sqlite": "one SQLite file"}


def study_storage(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> str:
    """The storage URL every phase's study lives in (distinct study names); a PostgreSQL server lives in ``stack``."""
    if args.storage == "journal":
        return f"journal:{workdir / 'optuna.journal'}"
    if args.storage == "sqlite":
        return f"sqlite:///{workdir / 'optuna.db'}"
    bindir = find_bindir(args.pg_bin)
    if bindir is None:
        raise SystemExit(f"--storage postgres: no initdb in {args.pg_bin or '/usr/lib/postgresql/*/bin'}; "
                         "name PostgreSQL's programs with --pg-bin, or use --storage journal")
    return stack.enter_context(loopback_server(bindir, ["optuna"])) + "/optuna"


def create_study(overrides: list[str]) -> None:
    """The study, its MLflow parent run and the MLflow store exist before any worker starts (no create races)."""
    from sweeper import compose
    from sweeper.study import open_study
    from sweeper.tracking import make_tracker, parent_run

    cfg, params = compose.load(overrides)
    study = open_study(cfg, params)
    parent_run(make_tracker(cfg), study, cfg, params)


def run_phase(args: argparse.Namespace, workdir: Path, storage: str, workers: int, gpus: list[str]) -> Phase:
    from sweeper import compose
    from sweeper.study import load_study

    phase = Phase(workers, gpus[:workers])
    if gpus and len(gpus) < workers:
        phase.skipped = f"not run: {workers} workers need {workers} GPUs, {len(gpus)} visible"
        return phase
    overrides = phase_overrides(args, workdir, storage, workers)
    create_study(overrides)
    procs, logs = [], []
    phase.launched = time.time()
    for i in range(workers):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i]
        log = workdir / f"scaling-{workers}w-worker{i}.log"
        logs.append(log)
        cmd = [sys.executable, "-m", "sweeper", "launch", *overrides, f"study.sampler.seed={i}", "--no-progress"]
        with log.open("w") as f:
            procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
    phase.exit_codes = [p.wait() for p in procs]
    phase.ended = time.time()
    for code, log in zip(phase.exit_codes, logs, strict=True):
        if code != 0:
            phase.notes.append(f"a worker exited with {code}; {log}:\n{log_tail(log)}")
    cfg, _ = compose.load(overrides)
    study = load_study(cfg)
    phase.trials = finished_timings(study)
    return phase


def build_report(args: argparse.Namespace, phases: list[Phase], gpu: GpuSampler, env: dict[str, str],
                 command: str) -> str:
    rows = []
    for ph in phases:
        if ph.skipped:
            rows.append([ph.workers, "-", "-", "-", "-", "-", ph.skipped])
            continue
        lanes = ph.lanes
        busy = []
        for g, lane in zip(ph.gpus, lanes, strict=False):
            if len(lane) > 1:
                busy.append(f"GPU {g}: {percent(gpu.busy_fraction(lane[1].start, lane[-1].end, g))}")
        walls = [t.end - t.start for t in ph.trials if t.state == "COMPLETE"]
        rows.append([ph.workers, f"{sum(t.state == 'COMPLETE' for t in ph.trials)} complete, "
                     f"{sum(t.state == 'FAIL' for t in ph.trials)} failed; per worker "
                     + "/".join(str(len(lane)) for lane in lanes),
                     num(ph.steady, 0), num(ph.end_to_end, 0), spread(walls), ", ".join(busy) or "n/a",
                     f"{ph.ended - ph.launched:.0f} s"])
    table = markdown_table(["workers", "trials", "trials / hour (steady)", "trials / hour (incl. start-up)",
                            "trial wall s: median [min, max]", "GPU busy (steady window)", "phase wall"], rows)
    by = {ph.workers: ph for ph in phases if not ph.skipped}
    one, two = by.get(1), by.get(2)
    results = table + "\n\n" + (
        f"- 2 workers / 1 worker, trials per hour: steady {ratio(two.steady, one.steady)}, including start-up "
        f"{ratio(two.end_to_end, one.end_to_end)} (goal >= 1.8x)." if one and two else
        "- No ratio: both phases are needed (see the table).")
    gpus = phases[-1].gpus if phases else []
    pinned = ", ".join(gpus) if gpus else "no GPU (CPU only: workers share the cores; the ratio says nothing of GPUs)"
    ran = [
        f"- Goal: {GOAL}. Ran: study storage = {STORAGE_LABELS[args.storage]}, one phase per worker count "
        f"({args.workers}), each a new study with a budget of {args.trials} trials of {args.steps} steps x "
        f"{args.batch} examples, search space {args.space!r} ("
        + ("only the learning rate varies: every trial does the same work" if args.space == "equal" else
           "the default space: trial costs vary with the sampled rank and targets")
        + "), TPE with constant liar, pruning off.",
        f"- Workers: `python -m sweeper launch` processes, worker i with sampler seed i, pinned with "
        f"CUDA_VISIBLE_DEVICES to {pinned}; each stops starting trials after {args.worker_timeout:.0f} s.",
        f"- Model: {model_label(args.cpu_smoke, args.weights)}; the GGUF conversion is cached before the run "
        "(bench/common.py prepare).",
        "- Warm-up excluded from the steady rate: process start, model load and each worker's first trial. "
        "Workers are told apart by the `worker` user attribute the sweep loop sets on each trial.",
        "- GPU busy: mean nvidia-smi utilization.gpu of each worker's GPU over its steady window. "
        + (gpu.note or ""),
    ]
    notes = [n for ph in phases for n in ph.notes]
    sections = [("What ran", "\n".join(ran)), ("Results", results)]
    if notes:
        sections.append(("Notes", "\n".join(f"- {n}" for n in notes)))
    return render_report("Benchmark 4: scaling over workers", env, command, sections)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs()
    workdir = make_workdir(args, "scaling")
    env, command = environment(), command_line()
    gpus = visible_gpus()
    counts = [int(w) for w in args.workers.split(",") if w.strip()]
    say(f"workdir {workdir}; GPUs: {', '.join(gpus) or 'none'}")
    phases = []
    with contextlib.ExitStack() as stack:
        storage = study_storage(args, workdir, stack)
        gpu = stack.enter_context(GpuSampler(gpus=gpus if all(g.isdigit() for g in gpus) else None))
        for k in counts:
            say(f"[{time.strftime('%H:%M:%S')}] {k} worker(s) ...")
            phases.append(run_phase(args, workdir, storage, k, gpus))
            say(f"[{time.strftime('%H:%M:%S')}] {k} worker(s): {len(phases[-1].trials)} trials")
    write_report(args.out, build_report(args, phases, gpu, env, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
