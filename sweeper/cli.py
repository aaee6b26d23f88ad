"""``python -m sweeper VERB [Hydra overrides]``: the verbs, each a few lines that read like a table of contents."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from objectives.config import ConfigError
from sweeper import interrupts, progress
from sweeper.config import SweepConfig
from sweeper.preflight import check_launch
from sweeper.quiet import quiet_third_party
from sweeper.tracking import redact

if TYPE_CHECKING:
    from sweeper.space import Param

EXAMPLES = {
    "launch": "python -m sweeper launch study.n_trials=3 'lora.r=choice(4,8,16)' study/sampler=random",
    "worker": "python -m sweeper worker study.name=big study.storage=postgresql://user@db-host/optuna",
    "train": "python -m sweeper train --config exports/best.yaml",
    "export": "python -m sweeper export study.name=qlora-default --out exports/best.yaml",
    "report": "python -m sweeper report study.name=qlora-default --params 8",
    "ui": "python -m sweeper ui            # then open the printed URL",
    "space": "python -m sweeper space search_space=targets",
    "plan": "python -m sweeper plan 'train.micro_batch_size=choice(4,16)' --device-memory-gb 24",
}



def sweeper_command() -> str:
    """How to run this program again from this shell: ``python -m sweeper`` when that ``python`` is this
    interpreter (an activated virtualenv), else this interpreter's path (relative to here when inside it)."""
    on_path = shutil.which("python")
    here = Path(sys.executable)
    if on_path and Path(on_path).parent == here.parent:
        return "python -m sweeper"
    try:
        shown = str(here.relative_to(Path.cwd()))
    except ValueError:
        shown = str(here)
    return f"{shlex.quote(shown)} -m sweeper"


def study_location(cfg: SweepConfig) -> str:
    """The overrides another verb needs to find this study: its name, and its storage unless it is the default."""
    parts = [f"study.name={cfg.study.name}"]
    if cfg.output_dir != "mlruns":
        parts.append(f"output_dir={cfg.output_dir}")
    if cfg.study.storage:
        parts.append(f"study.storage={shlex.quote(redact(cfg.storage_url))}")
    return " ".join(parts)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="Hydra overrides: key=value, group=option, or key='choice(..)'")
    p.add_argument("--config", help="a config file to start from instead of conf/config.yaml (e.g. an export)")


def cmd_launch(args: argparse.Namespace) -> int:
    from sweeper import compose

    cfg, params = compose.load(args.overrides, args.config)
    if cfg.launcher.name == "slurm":  # the cluster's own checks first: quicker than reaching the stores
        from sweeper.slurm import check_submission

        check_submission(cfg)
    model_config = check_launch(cfg, params)
    gpus: list[str] = []
    if cfg.launcher.name != "slurm":
        from sweeper.workers import engines_as_workers

        cfg, gpus = engines_as_workers(cfg, params, model_config)
    print(f"study {cfg.study.name!r}: {len(params)} searched parameters, budget {cfg.study.n_trials} trials; "
          f"storage {redact(cfg.storage_url)}; MLflow {redact(cfg.tracking_uri)}")
    if cfg.launcher.name == "slurm":
        return launch_on_slurm(cfg, params)
    from sweeper.launch import all_failed, run_sweep, summary

    if cfg.workers.count > 0:
        from sweeper.workers import WorkersGaveUp, launch_workers

        try:
            study = launch_workers(cfg, params, show_progress=not args.no_progress, gpus=gpus)
        except WorkersGaveUp as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    else:
        study = run_sweep(cfg, params, show_progress=not args.no_progress)
    print(summary(study))
    failures = all_failed(study)
    if failures is not None:
        print(f"error: {failures}\nthe trials' logs: {sweeper_command()} report {study_location(cfg)}", file=sys.stderr)
        return 1
    print(f"browse: {sweeper_command()} ui" + (f" output_dir={cfg.output_dir}" if cfg.output_dir != "mlruns" else "")
          + "\n"
          f"export: {sweeper_command()} export {study_location(cfg)}")
    return 0


def launch_on_slurm(cfg: SweepConfig, params: Sequence[Param]) -> int:
    """Submit the workers as one job array and return: the queue runs the sweep."""
    from sweeper.slurm import submit_workers

    job = submit_workers(cfg, params)
    if job is None:
        print(f"study {cfg.study.name!r} already has its {cfg.study.n_trials} finished trials; nothing submitted")
        return 0
    what = f"job array {job.job_id}: {job.workers} workers" if job.workers > 1 else f"job {job.job_id}: 1 worker"
    print(f"submitted SLURM {what} for study {cfg.study.name!r} in "
          f"{redact(cfg.storage_url)}\n"
          f"watch it: squeue -j {job.job_id}   (logs: {job.folder}/{job.job_id}_<task>_0_log.out)\n"
          f"its trials: {sweeper_command()} report {study_location(cfg)}\n"
          f"stop it: scancel {job.job_id}   (a cancelled task's running trial is failed and retried)")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from sweeper import compose

    # Started by `launch workers.count=N`, --config is the launch's composed config (see sweeper.workers).
    cfg, params = compose.load(args.overrides, args.config)
    check_launch(cfg, params)
    from sweeper.launch import run_worker

    return run_worker(cfg, params, show_progress=not args.no_progress)


def cmd_train(args: argparse.Namespace) -> int:
    import shlex

    from sweeper import compose

    cfg, _ = compose.load(args.overrides, args.config)
    check_launch(cfg, [], study=False)
    from sweeper.export import value_lines
    from sweeper.launch import SingleRun, run_single

    run = SingleRun()
    # The same store as this run's: `ui` composes the same config.
    ui = shlex.join(["python", "-m", "sweeper", "ui", *(["--config", args.config] if args.config else []),
                     *args.overrides])
    try:
        value = run_single(cfg, show_progress=not args.no_progress, run=run)
    except BaseException:
        if run.run_id is not None:  # a failed or interrupted run is worth finding too
            print("\n".join(run.where(cfg, ui)), file=sys.stderr)
        raise
    print("\n".join(value_lines(cfg.study.objectives, value if isinstance(value, list) else [value], cfg.provenance)))
    if run.run_id is not None:
        print("\n".join(run.where(cfg, ui)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sweeper import compose
    from sweeper.export import exported_config, pick_trial, write_export
    from sweeper.study import load_study

    cfg, _ = compose.load(args.overrides, args.config)
    study = load_study(cfg)
    trial = pick_trial(study, args.trial)
    out = Path(args.out or f"exports/{cfg.study.name}-trial{trial.number}.yaml")
    write_export(exported_config(cfg, study, trial), out)
    print(f"wrote {out} (trial {trial.number}, values {trial.values})\n"
          f"run it: {sweeper_command()} train --config {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from sweeper import compose
    from sweeper.report import report_table
    from sweeper.study import load_study

    cfg, _ = compose.load(args.overrides, args.config)
    print(report_table(load_study(cfg), max_params=args.params))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from sweeper import compose
    from sweeper.interrupts import Interrupted
    from sweeper.ui import StopSignals, check_port, print_last, start_ui, stop_ui, trials_view

    cfg, _ = compose.load(args.overrides, args.config)
    artifacts = cfg.output_path / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    if args.port is not None:
        check_port(args.host, args.port)  # before the store is opened: a busy port fails at once
    log = cfg.output_path / "ui.log"
    try:
        with StopSignals() as signals:
            # Written before the server starts, so the view is in the store once its URL is printed.
            view = trials_view(cfg.tracking_uri, cfg.experiment_name)
            # From the server's start to its stop, a signal is only noted, and looked for where the server can be
            # stopped: it can then not come between starting the server and holding its handle.
            with signals.held():
                proc, url = start_ui(cfg.tracking_uri, artifacts.as_uri(), host=args.host, port=args.port,
                                     log_path=log, signals=signals)
                try:
                    print(f"MLflow UI for {redact(cfg.tracking_uri)}: {url}   (Ctrl-C stops it)", flush=True)
                    if view is not None:
                        print(f"trials, best final eval loss first, with eval loss and trial state: {url}/{view}",
                              flush=True)
                    while (code := proc.poll()) is None:
                        signals.check()
                        time.sleep(0.2)
                finally:
                    stop_ui(proc)
    except Interrupted as stop:
        print_last(f"{stop}: stopped the MLflow UI server and all its processes")
        return stop.exit_code
    print(f"error: the MLflow UI server exited by itself with code {code}; its log: {log}", file=sys.stderr)
    return 1


def cmd_space(args: argparse.Namespace) -> int:
    from sweeper import compose
    from sweeper.compose import SEARCHABLE_PATHS
    from sweeper.values import volume

    cfg, params = compose.load(args.overrides, args.config)
    size = volume(params)
    print(f"search space ({len(params)} parameters, "
          f"{'continuous' if math.isinf(size) else f'{size:g} configurations'}):")
    table = [("name", "path", "distribution", "condition"),
             *((p.name, p.path, p.describe(), f"when {p.describe_condition()}" if p.when else "") for p in params)]
    name_w, path_w = (max(24, *(len(row[i]) for row in table)) for i in (0, 1))  # 24: as the fixed values below
    dist_w = max(len(row[2]) for row in table)
    for name, path, dist, cond in table:
        print(f"  {name:<{name_w}} {path:<{path_w}} {dist:<{dist_w}}   {cond}".rstrip())
    from sweeper.config import to_container

    flat = {f"{k}.{f}": v for k, sect in to_container(cfg).items() if isinstance(sect, dict)
            for f, v in sect.items()}
    searched = {p.path for p in params}
    print("fixed values:")
    for path in SEARCHABLE_PATHS:
        if path not in searched:
            print(f"  {path:<24} {flat.get(path)!r}")
    print(f"sampler {cfg.study.sampler.name} (seed {cfg.study.sampler.seed}), pruner {cfg.study.pruner.name}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from sweeper import compose
    from sweeper.plan import plan

    cfg, params = compose.load(args.overrides, args.config)
    memory = None if args.device_memory_gb is None else int(args.device_memory_gb * 2**30)
    print(plan(cfg, params, memory))
    return 0


TRAINING_VERBS = ("launch", "worker", "train")

VERBS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "launch": (cmd_launch, "Create or resume the study and run trials until the budget is reached."),
    "worker": (cmd_worker, "Join an existing study (same overrides as its launch) and run trials until its budget."),
    "train": (cmd_train, "One QLoRA training run from a config (no study), e.g. an exported best trial."),
    "export": (cmd_export, "Write a trial (default: the best) as a Hydra config that `train` runs as is."),
    "report": (cmd_report, "Print the study's trials as a table: values, key parameters, time, why pruned or failed."),
    "ui": (cmd_ui, "Serve the MLflow UI on the sweep's store (127.0.0.1, a free port) and print its URL."),
    "space": (cmd_space, "Print the resolved search space and the fixed values; runs nothing."),
    "plan": (cmd_plan, "Dry run: predicted peak memory and time per trial at the space's corners; trains nothing."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweeper", description="Hyperparameter sweeps for QLoRA fine-tuning (Hydra + Optuna + MLflow).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES.values()))
    verbose_help = ("also the libraries' log lines, warnings and progress bars (Optuna's line per trial, "
                    "MLflow, transformers, bitsandbytes); LOGLEVEL=DEBUG does the same")
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (fn, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=f"example:\n  {EXAMPLES[name]}", formatter_class=argparse.RawDescriptionHelpFormatter)
        _config_args(p)
        p.set_defaults(func=fn)
        # SUPPRESS: `sweeper -v VERB` stays verbose, where the verb's default would reset it.
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
        if name in ("launch", "worker", "train"):
            p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
        if name == "export":
            p.add_argument("--trial", type=int, help="trial number (default: the best trial)")
            p.add_argument("--out", help="output file (default: exports/<study>-trial<N>.yaml)")
        if name == "report":
            p.add_argument("--params", type=int, default=6, help="parameter columns at most (default: 6)")
        if name == "plan":
            p.add_argument("--device-memory-gb", type=float, metavar="N",
                           help="check the corners against N GiB (default: the CUDA device's memory, if any)")
        if name == "ui":
            p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
            p.add_argument("--port", type=int, help="port (default: a free one)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Options and overrides in any order (`launch model=x --no-progress study.n_trials=1`): argparse ends the
    # overrides at the first option and returns the later ones as unrecognized. parse_intermixed_args would
    # join them, but refuses a parser with subcommands.
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *rest]
    level = os.environ.get("LOGLEVEL", "INFO")
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    verbose = args.verbose or level.upper() == "DEBUG"
    progress.VERBOSE = verbose  # the workers a launch starts get -v on their command line
    if not verbose:
        quiet_third_party()
    # Commands that train stop their trials cleanly on SIGINT and SIGTERM (ui stops its server its own way).
    handled = interrupts.handled() if args.verb in TRAINING_VERBS else contextlib.nullcontext()
    try:
        with handled:
            return int(args.func(args))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except interrupts.Interrupted as e:
        print(f"interrupted by {e}: running trials are recorded as failed ({interrupts.REASON}) and their MLflow "
              "runs as KILLED; the same command resumes the study", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
