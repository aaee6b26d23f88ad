"""Benchmark 5: many trials in one pass (``workers.slots``) against one trial at a time and against worker processes.

Every method is the user's own command, ``python -m sweeper launch``, on the default search space and trial
length, run for ``--seconds`` (``study.timeout_s``: no trial starts after it); nvidia-smi samples the GPU
meanwhile. Trials per hour count the finished trials (complete or pruned) from the first trial's end to
the timeout, or to the launch's end where that came first; trial steps per hour count every trial's steps from
the first trial's start to the same end, which waves of slots that start and end together do not tilt. A
launch and its workers are killed ``--seconds`` + ``--grace`` after its start, start-up included. A second part
runs the same 16 grid-sampler trials (pruning off) one at a time and in slots and pairs them by parameters: the
per-trial difference of the eval loss says whether sharing a pass changes results.

    PYTHONPATH=$PWD python bench/slots_throughput.py --model-source $M --out $R/slots.md
    PYTHONPATH=$PWD python bench/slots_throughput.py --shape 1b --weights random --methods 1,16 --out $R/slots_1b.md
    PYTHONPATH=$PWD python bench/slots_throughput.py --cpu-smoke --out $R/slots_smoke.md
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, base_parser, command_line, environment, log_tail, make_workdir
from bench.gpu import GpuSampler
from bench.models import SHAPE_NAMES, model_overrides
from bench.report import markdown_table, num, percent, ratio, render_report, say, write_report
from bench.timing import TrialTiming, best_value, finished_timings, steps_per_hour


@dataclass
class Method:
    """One launch: a label and its overrides."""

    label: str
    overrides: list[str]
    trials: list[TrialTiming] = field(default_factory=list)
    started: float = 0.0
    ended: float | None = None
    """When the launch exited or was killed (epoch seconds); None before it ran."""
    exit_code: int | None = None
    log: str = ""

    def window(self, seconds: float) -> tuple[float, float] | None:
        """From the first trial's end to the timeout (counted from the first trial's start, as Optuna does), or to
        the launch's end where it ended before that: a launch whose start-up outlasts ``--grace`` is killed inside
        the window, and the time after the kill holds neither trials nor GPU work of its own. The trials still
        running at a kill never finish and are not counted: a killed launch's rates are a little low."""
        if len(self.trials) < 2:
            return None
        first_end = min(t.end for t in self.trials)
        end = min(t.start for t in self.trials) + seconds
        return first_end, end if self.ended is None else min(end, self.ended)

    def start_up(self) -> float | None:
        """Seconds from the launch's start to its first trial's start (imports, the base, the workers)."""
        return min(t.start for t in self.trials) - self.started if self.trials else None

    def steady(self, seconds: float) -> float | None:
        """Finished trials per hour inside :meth:`window`: no start-up, no drain after the timeout."""
        window = self.window(seconds)
        if window is None or window[1] <= window[0]:
            return None
        n = sum(window[0] < t.end <= window[1] for t in self.trials)
        return n / (window[1] - window[0]) * 3600

    def step_rate(self, seconds: float) -> float | None:
        """Trial steps per hour from the first trial's start to the timeout, or to the launch's end where it ended
        before (:func:`bench.timing.steps_per_hour`)."""
        if not self.trials:
            return None
        start = min(t.start for t in self.trials)
        return steps_per_hour(self.trials, start, seconds if self.ended is None else min(seconds, self.ended - start))


# The same 16 grid points both ways (pruning off), whatever order the slots ask for them: pairs by parameters.
PAIRED_SPACE = ["search_space=none", "study/sampler=grid", "study/pruner=none", "lora.r=choice(8,32)",
                "lora.targets=choice(qk,all-linear)", "optimizer.lr=choice(1e-4,1e-3)", "lora.dropout=choice(0.0,0.05)"]


def methods_from(spec: str) -> list[Method]:
    """``1,8,16,auto,w8,64t,w2x32``: slots per worker, engines as ``workers.engines=auto`` decides (``1`` one at a
    time; ``Kt``: the engine in the launch's own process, not in one of its own), ``wN`` N worker processes on one
    GPU, ``wNxK`` N workers of K slots each; ``+key=value`` after any of them adds an override to that method alone
    (``1+model.lean_layers=false``, ``32+workers.engines=1``)."""
    out = []
    for entry in spec.split(","):
        item, *extra = entry.strip().split("+")
        if item.startswith("w"):
            n, x, k = item[1:].partition("x")
            workers, slots = int(n), int(k) if x else 1
            label = f"{workers} workers" + (f" of {slots} slots" if x else "")
            out.append(Method(label, [f"workers.count={workers}", f"workers.per_gpu={workers}",
                                      f"workers.slots={slots}"]))
        elif item == "1":
            out.append(Method("one at a time", ["workers.slots=1"]))
        elif item.endswith("t"):
            out.append(Method(f"slots={item[:-1]}, engine in the launch's process",
                              [f"workers.slots={item[:-1]}", "workers.engine_process=false"]))
        else:
            engines = "" if any(e.startswith("workers.engines=") for e in extra) else ", engines auto"
            out.append(Method(f"slots={item}{engines}", [f"workers.slots={item}"]))
        if extra:
            out[-1].label += ", " + " ".join(extra)
            out[-1].overrides += extra
    return out


def launch(args: argparse.Namespace, method: Method, common: list[str], workdir: Path, name: str,
           seconds: float, n_trials: int) -> None:
    out = workdir / name
    cmd = [sys.executable, "-m", "sweeper", "launch", "--no-progress", *common, *method.overrides,
           f"output_dir={out}", f"study.name={name}", f"study.n_trials={n_trials}", f"study.timeout_s={seconds}"]
    say(f"{method.label}: {' '.join(cmd[2:])}")
    log = workdir / f"{name}.log"
    method.started = time.time()
    with open(log, "w") as fh:
        # A session of its own: a launch that runs worker processes is stopped with them, so that none trains on
        # while the next method is measured.
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            method.exit_code = proc.wait(timeout=seconds + args.grace)
        except subprocess.TimeoutExpired:  # killed: its finished trials are in the study all the same
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            method.exit_code = -9
            say(f"  still running {seconds + args.grace:.0f} s after its start: killed with its workers")
        method.ended = time.time()
    method.log = log_tail(log)
    method.trials = load_trials(out, name)
    say(f"  exit {method.exit_code}; {len(method.trials)} finished trials")


def load_trials(out: Path, name: str) -> list[TrialTiming]:
    import optuna

    journal, sqlite = out / "optuna.journal", out / "optuna.db"
    if journal.is_file():
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        storage: object = JournalStorage(JournalFileBackend(str(journal)))
    elif sqlite.is_file():
        storage = f"sqlite:///{sqlite}"
    else:
        return []
    return finished_timings(optuna.load_study(study_name=name, storage=storage))  # type: ignore[arg-type]


def pairs_of(one: Method, many: Method) -> list[tuple[dict[str, Any], float, float]]:
    """(params, eval loss one at a time, eval loss in slots) of every completed trial run with the same params
    both ways."""
    by_params = {repr(sorted(t.params.items())): t.value for t in one.trials
                 if t.state == "COMPLETE" and t.value is not None}
    out = []
    for t in many.trials:
        reference = by_params.get(repr(sorted(t.params.items())))
        if t.state == "COMPLETE" and t.value is not None and reference is not None:
            out.append((dict(sorted(t.params.items())), reference, t.value))
    return out


def paired(one: Method, many: Method) -> tuple[int, float | None, float | None]:
    """(pairs, mean difference many - one of the eval loss, its standard error) over trials with equal params."""
    diffs = [b - a for _, a, b in pairs_of(one, many)]
    if not diffs:
        return 0, None, None
    sem = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return len(diffs), statistics.fmean(diffs), sem


def complete(trials: Sequence[TrialTiming]) -> list[TrialTiming]:
    """The complete trials in the order they ended (a pruned trial has no final eval loss)."""
    return sorted((t for t in trials if t.state == "COMPLETE" and t.value is not None), key=lambda t: t.end)


def best_after(trials: Sequence[TrialTiming], k: int) -> float | None:
    """The best eval loss of the first ``k`` trials to complete: slots end their first pruned trials early, so
    counting finished trials would compare them before any completed."""
    return best_value(complete(trials)[:k])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__ or "")
    p.add_argument("--shape", default="135m", choices=["135m", "1b", "8b"])
    p.add_argument("--weights", choices=["real", "random"], default="real")
    p.add_argument("--methods", default="1,w8,8,16,32",
                   help="1: one at a time; K or auto: slots; Kt: the engine in the launch's process; wN: N workers; "
                        "wNxK: N workers of K slots each; +key=value after any adds an override to it")
    p.add_argument("--seconds", type=float, default=80.0, help="study.timeout_s of every method")
    p.add_argument("--paired", default="16", help="slots for the paired part ('' skips it)")
    p.add_argument("--paired-trials", type=int, default=16, help="16 covers the paired grid once")
    p.add_argument("--extra", default="", help="more overrides for every launch, space-separated")
    p.add_argument("--grace", type=float, default=240.0,
                   help="a launch and its workers are killed --seconds + --grace after its start (start-up included); "
                        "one killed before its timeout is measured up to the kill")
    return p.parse_args(argv)


def model_name(args: argparse.Namespace) -> str:
    return "tiny random model (CPU smoke: numbers mean nothing)" if args.cpu_smoke else \
        f"{SHAPE_NAMES[args.shape]} ({args.weights} weights)"


def throughput_lines(args: argparse.Namespace, methods: list[Method], gpu: GpuSampler) -> list[str]:
    """The trials-per-hour table of ``methods`` and the best eval loss after as many trials of each."""
    rate = {m.label: m.steady(args.seconds) for m in methods}
    steps = {m.label: m.step_rate(args.seconds) for m in methods}
    # The ratios are against one at a time wherever it ran, whatever order the methods ran in.
    reference = next((m.label for m in methods if m.overrides == ["workers.slots=1"]), methods[0].label)
    base, base_steps = rate[reference], steps[reference]
    rows = []
    for m in methods:
        window = m.window(args.seconds)
        busy = gpu.busy_fraction(*window) if window else None
        rows.append([m.label, str(len(m.trials)), num(rate[m.label], 0), ratio(rate[m.label], base), percent(busy),
                     num(steps[m.label], 0), ratio(steps[m.label], base_steps), num(best_value(m.trials), 4),
                     num(m.start_up(), 0), str(m.exit_code)])
    k = min((len(complete(m.trials)) for m in methods), default=0)
    lines = [f"Model: {model_name(args)}; "
             f"each method ran `python -m sweeper launch` for {args.seconds:.0f} s (study.timeout_s).", "",
             markdown_table(["method", "finished trials", "trials/h (steady)", "vs one at a time", "GPU busy",
                             "trial steps/h", "steps vs one at a time", "best eval loss", "start-up s", "exit"],
                            rows), "",
             "Trial steps per hour count every trial's steps inside the window from the first trial's start to the "
             "timeout (or to the launch's end, where it came first), a trial's steps spread evenly over its time: "
             "slots start and finish trials in waves, which makes finished trials per hour swing with where the "
             "window cuts them, while steps do not. A launch killed before its timeout (exit -9) leaves its running "
             "trials uncounted. Start-up: from the launch's start to its first trial's.", "",
             f"Best eval loss after the first {k} complete trials of each: "
             + ", ".join(f"{m.label} {num(best_after(m.trials, k), 4)}" for m in methods)]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = make_workdir(args, "slots")
    if args.cpu_smoke:
        common = [*model_overrides("tiny", None, True), "train.max_steps=4", "train.eval_every=2",
                  "data.max_length=64", "data.max_eval_examples=8"]
        args.seconds, args.methods, args.paired, args.paired_trials = 15.0, "1,2", "2", 4
    else:
        common = model_overrides(args.shape, args.model_source, args.weights == "random")
    common += args.extra.split()
    methods = methods_from(args.methods) if args.methods else []
    # One engine for the paired part: it asks whether sharing a pass changes a trial's result.
    pairs = [Method("one at a time", ["workers.slots=1"]),
             Method(f"slots={args.paired}", [f"workers.slots={args.paired}", "workers.engines=1"])
             ] if args.paired else []
    env = environment()
    with GpuSampler() as gpu:
        # The report is rewritten after every launch, so a run cut short keeps the launches it finished.
        for i, m in enumerate(methods):
            launch(args, m, common, workdir, f"m{i}", args.seconds, 100_000)
            write_report(args.out, report(args, argv, env, methods[:i + 1], [], gpu), final=False)
        for i, m in enumerate(pairs):
            launch(args, m, [*common, *PAIRED_SPACE], workdir, f"p{i}", args.seconds * 4, args.paired_trials)
            write_report(args.out, report(args, argv, env, methods, pairs[:i + 1], gpu), final=False)
        write_report(args.out, report(args, argv, env, methods, pairs, gpu))
    return 0


def report(args: argparse.Namespace, argv: Sequence[str] | None, env: dict[str, str], methods: list[Method],
           pairs: list[Method], gpu: GpuSampler) -> str:
    """The report of the launches that ran: the throughput table, the paired part once both of its launches ran."""
    lines = throughput_lines(args, methods, gpu) if methods else [f"Model: {model_name(args)}."]
    if len(pairs) == 2:
        n, mean, sem = paired(pairs[0], pairs[1])
        lines += ["", f"Paired ({args.paired_trials} grid trials, pruning off, the same parameters both "
                  f"ways): {n} pairs; eval loss {pairs[1].label} - one at a time: mean {num(mean, 5)}"
                  f" (standard error {num(sem, 5)})", "",
                  markdown_table(["parameters", "one at a time", pairs[1].label, "difference"],
                                 [[", ".join(f"{k}={v}" for k, v in params.items()), num(a, 5), num(b, 5),
                                   num(b - a, 5)] for params, a, b in pairs_of(*pairs)])]
    for m in [*methods, *pairs]:
        if m.exit_code:
            lines += ["", f"{m.label} exited {m.exit_code}; its log ends:", "```", m.log, "```"]
    return render_report("Benchmark 5: trials in slots", env, command_line(argv),
                         [("Trials per hour", "\n".join(lines))])

if __name__ == "__main__":
    sys.exit(main())
