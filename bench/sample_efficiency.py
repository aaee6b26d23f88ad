"""Benchmark 3: sample efficiency with the real default weights: TPE + successive halving against random
search and TPE, both without pruning.

Every (strategy, seed) is its own study over the default search space (conf/search_space/default.yaml),
with the same trial budget, the same trial length and the base loaded once for all of them. The target is
the best eval loss any study reached, plus 1%; each study's cost is the GPU time (sum of its trials' wall
times, pruned ones included, in trial order) until its first complete trial at or under the target.

    PYTHONPATH=$PWD python bench/sample_efficiency.py --out $R/sample_efficiency.md \\
        --model-source $M
    PYTHONPATH=$PWD python bench/sample_efficiency.py --out $R/sample_efficiency_smoke.md --cpu-smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import base_parser, command_line, environment, make_workdir, quiet_logs
from bench.efficiency_stats import TOLERANCE, StudyRun, median_to_target, pooled_estimate, ratio, steps_of, target
from bench.models import model_label, model_overrides
from bench.report import markdown_table, num, render_report, say, spread, write_report
from bench.timing import TrialTiming, finished_timings, time_to_target

GOAL = "over at least 3 seeds, TPE + pruning needs at most a third of random search's GPU time"
STRATEGIES: dict[str, list[str]] = {
    "tpe+sh": ["study/sampler=tpe", "study/pruner=successive_halving"],
    "random": ["study/sampler=random", "study/pruner=none"],
    "tpe": ["study/sampler=tpe", "study/pruner=none"],
}
LABELS = {"tpe+sh": "TPE + successive halving", "random": "random, no pruning", "tpe": "TPE, no pruning"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__ or "")
    p.add_argument("--seeds", default="0,1,2", help="sampler seeds, one study per strategy and seed")
    p.add_argument("--trials", type=int, default=10, help="trial budget of every study")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps of an unpruned trial")
    p.add_argument("--eval-every", type=int, default=4, help="evaluations (and pruning decisions) every N steps")
    p.add_argument("--batch", type=int, default=8, help="micro-batch size")
    p.add_argument("--study-timeout", type=float, default=36.0,
                   help="stop starting trials in a study after this many seconds (equal GPU time at most)")
    p.add_argument("--weights", choices=["real", "random"], default="real")
    p.add_argument("--jobs", type=int, default=1,
                   help="run the studies in this many processes at once, spread over the visible GPUs (trial "
                        "times are then measured on shared GPUs, so fewer trials fit in --study-timeout)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # a job's studies: "seed:strategy,..."
    p.add_argument("--dump", default=None, help=argparse.SUPPRESS)  # where a job writes its runs (JSON)
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.seeds, args.trials, args.steps, args.eval_every, args.batch = "0", 2, 2, 1, 2
        args.study_timeout = 60.0
    return args


def common_overrides(args: argparse.Namespace, workdir: Path) -> list[str]:
    out = [*model_overrides("tiny" if args.cpu_smoke else "135m", args.model_source, args.weights == "random"),
           "search_space=default", f"train.max_steps={args.steps}", f"train.eval_every={args.eval_every}",
           f"train.micro_batch_size={args.batch}", f"output_dir={workdir}",
           f"study.storage=sqlite:///{workdir / 'optuna.db'}"]
    return out + (["data.max_length=64", "data.max_eval_examples=8"] if args.cpu_smoke else [])


def all_studies(args: argparse.Namespace) -> list[tuple[int, str]]:
    """(seed, strategy) pairs, seeds outermost: a run cut short still has every strategy for its first seeds."""
    if args.only:
        return [(int(seed), strategy) for seed, _, strategy in (x.partition(":") for x in args.only.split(","))]
    return [(int(seed), strategy) for seed in args.seeds.split(",") if seed.strip() for strategy in STRATEGIES]


def run_jobs(args: argparse.Namespace, argv: Sequence[str], workdir: Path) -> tuple[list[StudyRun], float]:
    """The studies split over ``args.jobs`` processes of this script, round-robin over the visible GPUs."""
    import json
    import os
    import subprocess

    from sweeper.workers import visible_gpus

    studies = all_studies(args)
    gpus = visible_gpus() or [""]
    procs = []
    for job in range(args.jobs):
        mine = studies[job::args.jobs]
        if not mine:
            continue
        jobdir = workdir / f"job{job}"
        cmd = [sys.executable, __file__, *strip_job_options(argv), "--workdir", str(jobdir),
               "--only", ",".join(f"{seed}:{strategy}" for seed, strategy in mine),
               "--dump", str(jobdir / "runs.json"), "--out", str(jobdir / "report.md")]
        # Each job's own CPU share: jobs x all-core thread pools would fight over the cores.
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // args.jobs))
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus[job % len(gpus)], "OMP_NUM_THREADS": threads}
        procs.append((jobdir, subprocess.Popen(cmd, env=env)))
    runs: list[StudyRun] = []
    warmups = []
    for jobdir, proc in procs:
        if proc.wait() != 0:
            say(f"job in {jobdir} failed with exit status {proc.returncode}")
            continue
        saved = json.loads((jobdir / "runs.json").read_text())
        warmups.append(saved["warmup_s"])
        runs += [StudyRun(r["strategy"], r["seed"], [TrialTiming(**t) for t in r["trials"]], r["capped"])
                 for r in saved["runs"]]
    order = {study: i for i, study in enumerate(studies)}
    runs.sort(key=lambda r: order[(r.seed, r.strategy)])
    return runs, max(warmups, default=math.nan)


def strip_job_options(argv: Sequence[str]) -> list[str]:
    """The command line without the options a job gets its own values for."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--jobs", "--workdir", "--only", "--dump", "--out"):
            skip = True
        elif not a.startswith(("--jobs=", "--workdir=", "--only=", "--dump=", "--out=")):
            out.append(a)
    return out


def run_studies(args: argparse.Namespace, workdir: Path) -> tuple[list[StudyRun], float]:
    """Warm up once, then every (seed, strategy) study with the one resident base."""
    import optuna

    from sweeper import compose
    from sweeper.launch import Resources
    from sweeper.objective import QLoRAObjective
    from sweeper.study import open_study

    common = common_overrides(args, workdir)
    cfg, _ = compose.load([*common, *STRATEGIES["tpe"]])
    resources = Resources.load(cfg)
    start = time.perf_counter()
    # One untimed trial of the default config: first CUDA kernels and allocator growth land here.
    QLoRAObjective(cfg, [], resources.base, resources.data, None, None, False)(optuna.trial.FixedTrial({}))
    warmup_s = time.perf_counter() - start
    runs = []
    for seed, strategy in all_studies(args):
        say(f"[{time.strftime('%H:%M:%S')}] seed {seed} {strategy} ...")
        cfg, params = compose.load([*common, *STRATEGIES[strategy], f"study.sampler.seed={seed}",
                                    f"study.name=efficiency-{strategy}-{seed}"])
        study = open_study(cfg, params)
        objective = QLoRAObjective(cfg, params, resources.base, resources.data, None, None, False)
        began = time.perf_counter()
        study.optimize(objective, n_trials=args.trials, timeout=args.study_timeout, catch=(Exception,))
        trials = finished_timings(study)
        capped = len(trials) < args.trials and time.perf_counter() - began >= args.study_timeout
        runs.append(StudyRun(strategy, seed, trials, capped))
    return runs, warmup_s


def build_report(args: argparse.Namespace, runs: list[StudyRun], warmup_s: float, env: dict[str, str],
                 command: str) -> str:
    goal = target(runs)
    ttt = {id(r): time_to_target(r.trials, goal) if goal is not None else None for r in runs}
    stt = {id(r): time_to_target(r.trials, goal, steps_of) if goal is not None else None for r in runs}
    rows, medians, step_medians = [], {}, {}
    for strategy in STRATEGIES:
        mine = [r for r in runs if r.strategy == strategy]
        times = [ttt[id(r)] for r in mine]
        medians[strategy] = median_to_target(times, [r.gpu_s for r in mine])
        step_medians[strategy] = median_to_target([stt[id(r)] for r in mine],
                                                  [sum(map(steps_of, r.trials)) for r in mine])
        reached = [t for t in times if t is not None]
        rows.append([LABELS[strategy], f"{len(reached)} of {len(mine)}", str(medians[strategy]),
                     spread(reached, 1), str(step_medians[strategy]),
                     spread([r.gpu_s for r in mine], 1),
                     spread([sum(t.state == "PRUNED" for t in r.trials) for r in mine], 0),
                     spread([r.best for r in mine], 4)])
    table = markdown_table(["strategy", "seeds reaching the target", "GPU s to target (median)",
                            "GPU s to target, reached: median [min, max]", "training steps to target (median)",
                            "GPU s per study", "pruned trials", "best eval loss"], rows)

    per_study = markdown_table(
        ["strategy", "seed", "trials (complete / pruned / failed)", "GPU s", "GPU s to target", "steps to target",
         "best eval loss", "stopped by timeout"],
        [[LABELS[r.strategy], r.seed,
          "/".join(str(sum(t.state == s for t in r.trials)) for s in ("COMPLETE", "PRUNED", "FAIL")),
          num(r.gpu_s, 1), num(ttt[id(r)], 1), num(stt[id(r)], 0), num(r.best, 4), "yes" if r.capped else "no"]
         for r in runs])
    seeds = sorted({r.seed for r in runs})
    best = goal / (1 + TOLERANCE) if goal is not None else None
    ran = [
        f"- Goal: {GOAL}. Ran {len(seeds)} seed(s) ({', '.join(map(str, seeds))}) x "
        f"{len(STRATEGIES)} strategies, each study up to {args.trials} trials of {args.steps} steps x {args.batch} "
        f"examples, evaluated every {args.eval_every} steps, stopping new trials after {args.study_timeout:.0f} s. "
        "Short trials and small budgets were chosen to fit the GPU time of this run; TPE's first 4 trials "
        f"are random (its start-up), so with {args.trials} trials per study it models the space for few.",
        f"- Model: {model_label(args.cpu_smoke, args.weights)}, NF4, loaded once for every study; "
        "search space: the default "
        "(rank, alpha ratio, targets, dropout, AdamW or SGD with each its learning rate, warmup, weight decay, "
        "momentum, Nesterov); data: the stdlib pairs; training seed 0 in every trial.",
        f"- Target: the best eval loss any study reached ({num(best, 4)}) plus "
        f"{TOLERANCE:.0%} = {num(goal, 4)}. GPU time = sum of trial wall times (training, evaluations, adapter "
        "swap) in trial order until the first complete trial at or under the target; pruned trials count "
        "for the time they ran. A study that never reaches it counts as infinitely long in the median; when the "
        'median study never reached it, the report gives what that study spent as a lower bound (shown as "> x").',
        "- Successive halving: the project's default (first rung at the first evaluation, reduction factor 3), "
        "asked at every "
        "evaluation but the last. No MLflow logging in these studies (the same for all).",
        f"- Warm-up excluded: model load and one untimed trial of the default config ({warmup_s:.1f} s) before "
        "the first study.",
        "- Training steps to target: the same sum counting each trial's optimizer steps (a pruned trial's last "
        "reported step) instead of its time.",
    ] + ([f"- The studies ran in {args.jobs} processes at once, spread over the visible GPUs: trial times are "
          "measured while each GPU was shared (the same for every strategy, which ran side by side)."]
         if args.jobs > 1 else [])
    results = (table + "\n\n- TPE + successive halving / random search, median GPU time to target: "
               f"{ratio(medians['tpe+sh'], medians['random'])} (goal <= 0.33); median training steps to target: "
               f"{ratio(step_medians['tpe+sh'], step_medians['random'])}.")
    pooled = pooled_estimate([t for r in runs if r.strategy == "random" for t in r.trials], goal) if goal else None
    sh = medians.get("tpe+sh")
    if pooled is not None and pooled.hits:
        results += (f"\n- Random search pooled over its {pooled.trials} trials (independent draws, so one study's "
                    f"trials to target are geometric): {pooled.hits} at or under the target; median GPU s to target "
                    f"{pooled.median_s:.0f} [95% interval {pooled.low_s:.0f}, {pooled.high_s:.0f}]"
                    + (f"; TPE + successive halving / random search {sh.value / pooled.median_s:.2f} "
                       f"[{sh.value / pooled.high_s:.2f}, {sh.value / pooled.low_s:.2f}]." if sh and sh.exact else "."))
    elif pooled is not None:
        results += (f"\n- Random search pooled over its {pooled.trials} trials: none at or under the target; its "
                    f"median GPU s to target is above {pooled.low_s:.0f} (95%).")
    return render_report("Benchmark 3: sample efficiency", env, command,
                         [("What ran", "\n".join(ran)), ("Results", results), ("Per study", per_study)])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs()
    workdir = make_workdir(args, "efficiency")
    env, command = environment(), command_line()
    say(f"workdir {workdir}")
    if args.jobs > 1 and not args.only:
        runs, warmup_s = run_jobs(args, sys.argv[1:] if argv is None else argv, workdir)
    else:
        runs, warmup_s = run_studies(args, workdir)
    if args.dump:
        import json

        Path(args.dump).write_text(json.dumps({"warmup_s": warmup_s, "runs": [
            {"strategy": r.strategy, "seed": r.seed, "capped": r.capped,
             "trials": [dataclasses.asdict(t) for t in r.trials]} for r in runs]}))
    write_report(args.out, build_report(args, runs, warmup_s, env, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
