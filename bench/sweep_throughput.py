"""Benchmark 1: sweep throughput of our sweeper against the two usual ways of running the same sweep.

- ours: ``sweeper.launch.run_sweep`` in one process (base loaded once, an adapter per trial, MLflow logging).
- A (trainer): ``Trainer.hyperparameter_search(backend="optuna")`` with a ``model_init`` that loads the NF4
  base and adds the LoRA adapter per trial, on the same data, batches, eval set and sampler.
- B (processes): one fresh Python process per trial (import, load, one trial, exit), driven by an Optuna
  study in this process with ask/tell: what Hydra's multirun with the Optuna sweeper amounts to.

Same search space (rank, targets qk/all-linear, AdamW or SGD with each its learning rate, cosine schedule),
same steps per trial, pruning off, the same seeded TPE sampler. Per method: trials per GPU-hour, overhead
per trial (wall time minus time in training and evaluation steps), GPU busy fraction (nvidia-smi), best
eval loss. The first trial of each method, and everything before it, is warm-up and is excluded.

    PYTHONPATH=$PWD python bench/sweep_throughput.py --out results/sweep.md \\
        --model-source /tmp/SmolLM2-135M-Instruct.Q4_1.gguf
    PYTHONPATH=$PWD python bench/sweep_throughput.py --out /tmp/sweep.md --cpu-smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import (
    REPO_ROOT,
    RESULT_PREFIX,
    GpuSampler,
    TrialTiming,
    assign_workers,
    base_parser,
    best_value,
    command_line,
    environment,
    finished_timings,
    free_accelerator,
    from_frozen,
    log_tail,
    loop_rows,
    make_workdir,
    markdown_table,
    model_label,
    model_overrides,
    num,
    overheads,
    percent,
    quiet_logs,
    ratio,
    render_report,
    run_child,
    say,
    spread,
    steady_per_hour,
    trainer_arguments,
    trainer_fixed_arguments,
    trial_walls,
    value_overrides,
    write_report,
)

ISSUE_SPEC = "24+ trials of about 60 s of training each on the default model, pruning off"
ISSUE_TRIAL_S = 60.0
# The space every method samples: rank, targets, optimizer with its own learning rate (cosine is fixed).
SPACE = ["search_space=optimizer", "lora.r=choice(8,16,32)", "lora.targets=choice(qk,all-linear)"]
METHODS = ("ours", "ours-ckpt", "ours-padded", "shared", "trainer", "processes")
LABELS = {"ours": "ours (one process, base loaded once)",
          "ours-ckpt": "ours, checkpointing always on (as A)",
          "ours-padded": "ours, padded batches (as A)",
          "shared": "ours, workers sharing the GPU (workers.per_gpu)",
          "trainer": "A: Trainer.hyperparameter_search + model_init",
          "processes": "B: fresh process per trial"}


@dataclass
class MethodResult:
    """What one method did: its trials and the times around them."""

    key: str
    trials: list[TrialTiming]
    began: float
    ended: float
    notes: list[str] = field(default_factory=list)
    workers: int = 1

    @property
    def best_loss(self) -> float | None:
        return best_value(self.trials)

    @property
    def lanes(self) -> list[list[TrialTiming]]:
        """The trials of each worker, in start order."""
        if self.workers == 1:
            return [sorted(self.trials, key=lambda t: t.start)]
        return assign_workers(self.trials, self.workers)

    @property
    def measured(self) -> list[TrialTiming]:
        """The trials after each worker's warm-up (first) trial."""
        return sorted((t for lane in self.lanes for t in lane[1:]), key=lambda t: t.start)

    @property
    def per_hour(self) -> float | None:
        """Steady completed trials per hour, summed over the workers."""
        rates = [r for r in map(steady_per_hour, self.lanes) if r is not None]
        return sum(rates) if rates else None

    @property
    def overheads(self) -> list[float]:
        return [o for lane in self.lanes for o in overheads(lane)[1:]]

    @property
    def window(self) -> tuple[float, float] | None:
        m = self.measured
        return (m[0].start, max(t.end for t in m)) if m else None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__ or "")
    p.add_argument("--methods", default="ours,ours-ckpt,shared,trainer,processes",
                   help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--trials", type=int, default=24, help="trials for ours and A (the first is warm-up)")
    p.add_argument("--shared-workers", type=int, default=4,
                   help="workers sharing the GPU in the 'shared' method (workers.count = workers.per_gpu)")
    p.add_argument("--process-trials", type=int, default=6,
                   help="trials for B, whose every trial pays a fresh process (the first is warm-up)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per trial (eval once, at the end)")
    p.add_argument("--batch", type=int, default=16, help="micro-batch size")
    p.add_argument("--weights", choices=["real", "random"], default="real",
                   help="the default model's weights, or random ones in its shape (same speed)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed, the same for every method")
    p.add_argument("--train-seed", type=int, default=0,
                   help="train.seed of every trial (adapter init, data order, dropout), the same for every method")
    p.add_argument("--method-timeout", type=float, default=150.0,
                   help="stop starting trials of a method after this many seconds (keeps the run bounded)")
    p.add_argument("--trainer-precision", choices=["match", "bf16"], default="match",
                   help="match: A computes like our loop (no autocast); bf16: A adds bf16 autocast (bf16=True)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.trials, args.process_trials, args.steps, args.batch, args.shared_workers = 2, 1, 2, 2, 2
    return args


def fixed_overrides(args: argparse.Namespace) -> list[str]:
    """Everything but the search space, identical for every method."""
    shape = "tiny" if args.cpu_smoke else "135m"
    out = [*model_overrides(shape, args.model_source, args.weights == "random"),
           f"train.max_steps={args.steps}", f"train.eval_every={args.steps}", f"train.micro_batch_size={args.batch}",
           "optimizer.scheduler=cosine", "study/sampler=tpe", f"study.sampler.seed={args.seed}", "study/pruner=none",
           f"train.seed={args.train_seed}"]
    if args.cpu_smoke:
        out += ["data.max_length=64", "data.max_eval_examples=8"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# ours


def run_ours(args: argparse.Namespace, overrides: list[str], workdir: Path, key: str = "ours",
             extra: Sequence[str] = ()) -> MethodResult:
    from sweeper import compose
    from sweeper.launch import run_sweep

    began = time.time()
    cfg, params = compose.load([*overrides, *SPACE, *extra, f"study.n_trials={args.trials}", f"study.name=bench-{key}",
                                f"study.timeout_s={args.method_timeout}", f"output_dir={workdir / key}"])
    study = run_sweep(cfg, params, show_progress=False)
    ended = time.time()
    return MethodResult(key, finished_timings(study), began, ended)


def run_shared(args: argparse.Namespace, overrides: list[str], workdir: Path) -> MethodResult:
    """Ours as ``python -m sweeper launch workers.count=K workers.per_gpu=K``: K workers on the one GPU."""
    from sweeper import compose
    from sweeper.study import load_study

    k = args.shared_workers
    run = [*overrides, *SPACE, f"study.n_trials={args.trials}", "study.name=bench-shared",
           f"study.timeout_s={args.method_timeout}", f"output_dir={workdir / 'shared'}",
           f"study.storage=journal:{workdir / 'shared.journal'}", f"workers.count={k}", f"workers.per_gpu={k}"]
    log = workdir / "shared.log"
    began = time.time()
    with log.open("w") as out:
        code = subprocess.run([sys.executable, "-m", "sweeper", "launch", *run, "--no-progress"], cwd=REPO_ROOT,
                              stdout=out, stderr=subprocess.STDOUT).returncode
    ended = time.time()
    cfg, _ = compose.load(run)
    notes = [] if code == 0 else [f"the launcher exited with {code}; {log}:\n{log_tail(log)}"]
    return MethodResult("shared", finished_timings(load_study(cfg)), began, ended, notes, workers=k)


# ---------------------------------------------------------------------------------------------------------------
# A: Trainer.hyperparameter_search


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_trial_clock(device: Any, measure: Callable[[Any], float]) -> Any:
    """A TrainerCallback timing each trial's training steps and evaluation, and re-measuring the eval loss
    with our token-weighted evaluation (timed too, and removed from the method's time)."""
    from transformers import TrainerCallback

    class TrialClock(TrainerCallback):
        def __init__(self) -> None:
            self.first: float | None = None
            self.last: float | None = None
            self.number = -1
            self.trainer: Any = None  # the callback handler's own model reference is the first, stale one
            self.records: dict[int, dict[str, float]] = {}

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.first = self.last = None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.first is None:
                self.first = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _sync(device)
            self.last = time.perf_counter()

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                        **kw: Any) -> None:
            train_s = (self.last - self.first) if self.first is not None and self.last is not None else 0.0
            start = time.perf_counter()
            loss = measure(self.trainer.model)
            extra = time.perf_counter() - start
            self.records[self.number] = {"busy": train_s + float((metrics or {}).get("eval_runtime", 0.0)),
                                         "extra": extra, "token_loss": loss}

    return TrialClock()


def run_trainer(args: argparse.Namespace, overrides: list[str], workdir: Path) -> MethodResult:
    import optuna
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )

    from objectives.base import TORCH_DTYPES, initialise_lora, linear_module_names, pick_device
    from objectives.data import collate, prepare
    from objectives.sources import weights_path
    from objectives.targets import resolve_targets
    from objectives.training import eval_passes, evaluate
    from sweeper import compose
    from sweeper.config import to_container, to_schema
    from sweeper.space import apply_values, sample
    from sweeper.study import make_sampler

    began = time.time()
    cfg, params = compose.load([*overrides, *SPACE])
    path = weights_path(cfg.model)
    device = pick_device(cfg.train.device)
    dtype = TORCH_DTYPES[cfg.model.compute_dtype]
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id
    data = prepare(cfg.data, tokenizer, cfg.model.cache_path)
    # The batches our loop sees, in its order, read sequentially: both methods train on the same data.
    rows = [r for batch in loop_rows(data, cfg.train) for r in batch]
    config = to_container(cfg)

    def trial_config(trial: Any) -> Any:
        return cfg if trial is None else to_schema(apply_values(config, sample(trial, params)))

    def model_init(trial: Any = None) -> Any:
        # Runs before hp_space in each trial: it samples the LoRA values first (asking again gives the same).
        lora = trial_config(trial).lora
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.model.quant_type,
                                   bnb_4bit_use_double_quant=cfg.model.double_quant, bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype,
                                                     device_map={"": str(device)},
                                                     attn_implementation=cfg.model.attn_implementation)
        model.config.use_cache = False
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,  # the recipe's default
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        targets = resolve_targets(lora.targets, linear_module_names(model))
        peft = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.effective_alpha, lora_dropout=lora.dropout,
                                                target_modules=targets, use_rslora=lora.use_rslora, bias="none",
                                                task_type="CAUSAL_LM"))
        # peft draws the initial weights on the CPU, ours on the GPU they live on: the same distribution, other
        # values. Starting both loops from the same weights and random state leaves only the loops to compare.
        initialise_lora(peft, lora, cfg.train.seed)
        return peft

    def hp_space(trial: Any) -> dict[str, Any]:
        clock.number = trial.number
        return trainer_arguments(trial_config(trial))

    held_out = eval_passes(data, cfg.train.micro_batch_size, False, pad_id)  # padded, as A's Trainer evaluates
    clock = make_trial_clock(device, lambda model: evaluate(model, held_out, device))
    fixed = trainer_fixed_arguments(workdir / "trainer", cfg, device, args.trainer_precision == "bf16")
    trainer = Trainer(model_init=model_init, args=TrainingArguments(**fixed, **trainer_arguments(cfg)),
                      train_dataset=rows, eval_dataset=data.eval, data_collator=partial(collate, pad_id=pad_id),
                      callbacks=[clock])
    clock.trainer = trainer
    trainer.remove_callback(PrinterCallback)  # it would print every log dict: the report is the output
    storage = optuna.storages.InMemoryStorage()
    trainer.hyperparameter_search(hp_space=hp_space, n_trials=args.trials, direction="minimize", backend="optuna",
                                  sampler=make_sampler(cfg.study.sampler, params), storage=storage,
                                  study_name="bench-trainer", timeout=args.method_timeout)
    ended = time.time()
    study = optuna.load_study(study_name="bench-trainer", storage=storage)
    trials = []
    for t in study.get_trials(deepcopy=False):
        if t.datetime_complete is None:
            continue
        rec = clock.records.get(t.number, {})
        trials.append(dataclasses.replace(from_frozen(t, excluded=rec.get("extra", 0.0)), busy=rec.get("busy"),
                                          value=rec.get("token_loss", t.value)))
    own = [t.value for t in study.get_trials(deepcopy=False) if t.value is not None]
    notes = [f"A's own objective (Trainer.evaluate: per-batch mean losses averaged over examples): best "
             f"{num(min(own) if own else None, 4)}; the table shows the token-weighted loss that ours and B "
             "report, measured after Trainer.evaluate with our evaluation (its time is taken out of A's)."]
    del trainer
    return MethodResult("trainer", trials, began, ended, notes)


# ---------------------------------------------------------------------------------------------------------------
# B: a fresh process per trial


def run_processes(args: argparse.Namespace, overrides: list[str], workdir: Path) -> MethodResult:
    import optuna

    from sweeper import compose
    from sweeper.space import sample
    from sweeper.study import make_sampler

    began = time.time()
    cfg, params = compose.load([*overrides, *SPACE])
    study = optuna.create_study(sampler=make_sampler(cfg.study.sampler, params), direction="minimize")
    child = [*overrides, "search_space=none", f"output_dir={workdir / 'processes'}", "study.name=bench-processes"]
    notes = []
    for _ in range(args.process_trials):
        if time.time() - began > args.method_timeout:
            notes.append(f"stopped after {args.method_timeout:.0f} s (--method-timeout)")
            break
        trial = study.ask()
        cmd = [sys.executable, "-m", "bench.sweep_throughput", "child", str(trial.number),
               json.dumps([*child, *value_overrides(sample(trial, params))])]
        log = workdir / f"process-trial-{trial.number}.log"
        code, result = run_child(cmd, log)
        if code != 0 or result is None or result.get("value") is None:
            notes.append(f"trial {trial.number} failed (exit {code}); log {log}:\n{log_tail(log)}")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        trial.set_user_attr("train_seconds", result["train_seconds"])
        study.tell(trial, result["value"])
    ended = time.time()
    return MethodResult("processes", finished_timings(study), began, ended, notes)


def child_main(number: int, overrides: list[str]) -> int:
    """One trial in this fresh process: compose, load, train, evaluate, log to MLflow, report, exit."""
    import optuna

    from sweeper import compose
    from sweeper.launch import Resources, make_tracker
    from sweeper.objective import QLoRAObjective

    cfg, params = compose.load(overrides)
    resources = Resources.load(cfg)
    objective = QLoRAObjective(cfg, params, resources.base, resources.data, make_tracker(cfg), None, False)
    trial = optuna.trial.FixedTrial({}, number=number)
    value = objective(trial)
    say(RESULT_PREFIX + json.dumps({"value": value, "train_seconds": trial.user_attrs.get("train_seconds")}))
    return 0


RUNNERS: dict[str, Callable[[argparse.Namespace, list[str], Path], MethodResult]] = {
    "ours": run_ours, "shared": run_shared, "trainer": run_trainer, "processes": run_processes,
    "ours-ckpt": partial(run_ours, key="ours-ckpt", extra=["model.gradient_checkpointing=true"]),
    "ours-padded": partial(run_ours, key="ours-padded", extra=["train.packing=false"])}


# ---------------------------------------------------------------------------------------------------------------
# Report


def result_row(r: MethodResult, gpu: GpuSampler) -> list[str]:
    m = r.measured
    busy = [t.busy for t in m if t.busy is not None]
    window = r.window
    warmup = f"+{r.workers} warm-up" if r.workers > 1 else "+1 warm-up"
    return [LABELS[r.key], f"{len(m)} ({warmup})", num(r.per_hour, 0), spread(r.overheads), spread(busy),
            percent(gpu.busy_fraction(*window) if window else None), num(r.best_loss, 4)]


def median_busy(r: MethodResult) -> float | None:
    busy = [t.busy for t in r.measured if t.busy is not None]
    return statistics.median(busy) if busy else None


def params_key(t: TrialTiming) -> str:
    """A trial's sampled parameters as a key: the same in every method that sampled them."""
    return json.dumps(t.params, sort_keys=True)


def measured_walls(r: MethodResult) -> dict[str, tuple[float, float]]:
    """(wall, train+eval) seconds of each measured complete trial, keyed by its sampled parameters."""
    return {params_key(t): (wall, t.busy)
            for lane in r.lanes for t, wall in list(zip(lane, trial_walls(lane), strict=True))[1:]
            if t.state == "COMPLETE" and t.busy is not None}


def paired_speedup(r: MethodResult, reference: MethodResult,
                   reference_trial_s: float | None = None) -> tuple[int, float] | None:
    """(pairs, r's trials per hour over the reference's) on the measured trials both ran with the same
    parameters, so a different mix of trials cannot tilt it. With ``reference_trial_s``, each pair's training
    and evaluation is scaled by the factor that makes the reference's take that long; overheads stay as
    measured. None for several workers (their walls overlap) or without a pair."""
    mine, theirs = measured_walls(r), measured_walls(reference)
    pairs = [(mine[k], theirs[k]) for k in mine if k in theirs]
    if r.workers > 1 or reference.workers > 1 or not pairs:
        return None
    if reference_trial_s is None:
        return len(pairs), sum(w for _, (w, _) in pairs) / sum(w for (w, _), _ in pairs)
    scaled = [(busy * reference_trial_s / ref_busy + wall - busy, reference_trial_s + ref_wall - ref_busy)
              for (wall, busy), (ref_wall, ref_busy) in pairs]
    return len(pairs), sum(ref for _, ref in scaled) / sum(mine for mine, _ in scaled)


def best_of_first(trials: Sequence[TrialTiming], k: int) -> float | None:
    """The best complete value among the first ``k`` trials the sampler asked for (by trial number)."""
    return best_value(sorted(trials, key=lambda t: t.number)[:k])


def paired_differences(ours: Sequence[TrialTiming], theirs: Sequence[TrialTiming]) -> list[float]:
    """ours - theirs for every pair of complete trials with the same sampled parameters."""
    def complete(trials: Sequence[TrialTiming]) -> dict[str, float]:
        return {params_key(t): t.value for t in trials
                if t.state == "COMPLETE" and t.value is not None}

    mine, other = complete(ours), complete(theirs)
    return [mine[k] - other[k] for k in mine if k in other]


def paired_line(ours: MethodResult, reference: MethodResult, label: str) -> str:
    """The measured and the projected paired speedup of ours over a baseline, as a report line."""
    measured, projected = paired_speedup(ours, reference), paired_speedup(ours, reference, ISSUE_TRIAL_S)
    if measured is None or projected is None:
        return f"- Trials both ours and {label} ran with the same parameters: none (warm-up excluded)."
    return (f"- Trials both ours and {label} ran with the same parameters ({measured[0]}, warm-up excluded): ours / "
            f"{label} trials per hour on that same work {measured[1]:.2f}x. Projection, not a measurement: with each "
            f"pair's training and evaluation scaled so that {label}'s takes {ISSUE_TRIAL_S:.0f} s, overheads as "
            f"measured: {projected[1]:.2f}x.")


def checkpointing_note(r: MethodResult) -> str:
    ran = [t.checkpointing for t in r.trials if t.checkpointing is not None]
    return f"{r.key}: {sum(ran)} of {len(ran)} trials with checkpointing" if ran else f"{r.key}: not recorded"


def loss_lines(by: dict[str, MethodResult]) -> list[str]:
    """Best eval loss of ours against A at an equal number of trials, and the loops' noise at equal parameters."""
    if "ours" not in by or "trainer" not in by:
        return []
    ours, a = by["ours"].trials, by["trainer"].trials
    k = min(len(ours), len(a))
    diffs = paired_differences(ours, a)
    return [f"- Best eval loss over the first {k} trials of each (equal trials): ours "
            f"{num(best_of_first(ours, k), 4)}, A {num(best_of_first(a, k), 4)} (goal: the same or better). "
            "Trials with the same sampled parameters in "
            f"both ({len(diffs)}): ours - A = {spread(diffs, 4)}; ours lower in {sum(d < 0 for d in diffs)}."]


def per_trial_rows(r: MethodResult) -> list[list[str]]:
    rows = []
    for lane in r.lanes:
        for i, (t, wall) in enumerate(zip(lane, trial_walls(lane), strict=True)):
            params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
            over = wall - t.busy if t.busy is not None else None
            rows.append([r.key, str(t.number) + (" (warm-up)" if i == 0 else ""), t.state.lower(), num(wall),
                         num(t.busy), num(over), num(t.value, 4), params])
    return rows


def build_report(args: argparse.Namespace, results: list[MethodResult], gpu: GpuSampler, env: dict[str, str],
                 command: str) -> str:
    by = {r.key: r for r in results}
    rates = {k: r.per_hour for k, r in by.items()}
    ran = [f"- The issue asks for {ISSUE_SPEC}. Ran: " + "; ".join(
        f"{LABELS[r.key]}: {len(r.trials)} trial{'' if len(r.trials) == 1 else 's'}" for r in results) +
        f", each of {args.steps} steps x {args.batch} examples (median training + evaluation "
        + ", ".join(f"{k} {num(median_busy(r), 1)} s" for k, r in by.items())
        + " per trial). Trials were shortened" + (", and B runs fewer trials because each costs a fresh process,"
                                                  if "processes" in by else "") + " to fit the GPU time of this run.",
        f"- Model: {model_label(args.cpu_smoke, args.weights)}, NF4 base; data: the stdlib pairs, tokenized once by "
        "objectives.data.prepare; eval once at the end of each trial on the same held-out set.",
        "- Gradient checkpointing: A always (peft's `prepare_model_for_kbit_training` default, the usual recipe), "
        "and so does `ours-ckpt` (`model.gradient_checkpointing=true`); the other methods use the project's default "
        "`auto` (off for a trial the memory model predicts to fit without it): "
        + "; ".join(checkpointing_note(r) for r in results if r.key != "trainer") + ".",
        f"- Search space: {' '.join(SPACE[1:])} plus optimizer adamw/sgd with each its learning rate "
        "(conf/search_space/optimizer.yaml); cosine schedule; sampler TPE seed "
        f"{args.seed} for every method (same first random trials); pruning off; train.seed {args.train_seed} in "
        "every trial (adapter init, data order, dropout masks: with packing, a different draw of the masks than "
        "padded batches get, the same draw in every trial; bench/packing_parity.py varies it).",
        f"- A computes {'like our loop (no autocast)' if args.trainer_precision == 'match' else 'with bf16 autocast'}"
        "; it reads the same batches in the same order (sequential sampler over our loop's batches) and pads "
        "each batch, as Trainer's collators do. Ours and B train with the project's defaults, among them "
        "`train.packing=true` (a step's examples packed into rows of data.max_length: the same loss from fewer "
        "tokens of compute; benchmark 2 measures that part alone).",
        "- Ours and B log every trial to MLflow (B's child runs `QLoRAObjective` on a fixed trial, so it also "
        "logs its adapter every trial: a lone trial cannot know whether it is the best; ours logs the adapter "
        "when a trial becomes the best). A logs nothing (report_to none).",
        "- Warm-up excluded: each method's first trial and everything before it (imports, model conversion or "
        "load, tokenization). Rates count the trials after the first, from its end to the last trial's end.",
        "- Overhead per trial = wall time (trial start to next trial start) minus time in training and "
        "evaluation steps: ours and B from TrainResult.seconds (sum of step and eval times); A from a "
        "TrainerCallback (first step start to last step end, plus Trainer.evaluate's eval_runtime), which is "
        "generous to A (time between its steps counts as training).",
        "- GPU busy: mean nvidia-smi utilization.gpu (sampled every 0.2 s) over the measured window. "
        + (gpu.note or "Other processes on the same GPU would show here too."),
        ]
    if "shared" in by:
        ran.append(f"- The shared method is `python -m sweeper launch workers.count={args.shared_workers} "
                   f"workers.per_gpu={args.shared_workers}`: that many worker processes on the one GPU, each with the "
                   "base loaded once, on one study in a journal file (TPE with constant liar, worker i seeded i); its "
                   "rate is summed over the workers and its overheads are per worker (trial start to that worker's "
                   "next start).")
    headers = ["method", "trials measured", "trials / GPU-hour", "overhead s/trial: median [min, max]",
               "train+eval s/trial: median [min, max]", "GPU busy", "best eval loss"]
    table = markdown_table(headers, [result_row(r, gpu) for r in results])
    ours = rates.get("ours")
    goals = [f"- ours / A trials per hour: {ratio(ours, rates.get('trainer'))} (goal >= 1.3x); "
             f"ours / B: {ratio(ours, rates.get('processes'))} (goal >= 1.4x); median overhead of ours: "
             f"{spread(by['ours'].overheads) if 'ours' in by else 'n/a'} s (goal < 1 s)."]
    if "shared" in by:
        shared = rates["shared"]
        goals.append(f"- ours with {args.shared_workers} workers sharing the GPU / A: "
                     f"{ratio(shared, rates.get('trainer'))}; / B: {ratio(shared, rates.get('processes'))}; "
                     f"/ ours with one process: {ratio(shared, ours)}.")
    if "ours-ckpt" in by:
        goals.append(f"- ours with checkpointing always on / A: {ratio(rates['ours-ckpt'], rates.get('trainer'))}; "
                     f"ours (auto) / ours with checkpointing always on: {ratio(ours, rates['ours-ckpt'])}.")
    goals += loss_lines(by)
    if "ours" in by and "ours-padded" in by:
        diffs = paired_differences(by["ours"].trials, by["ours-padded"].trials)
        goals.append(f"- Packed - padded batches in our loop, trials with the same parameters ({len(diffs)}): "
                     f"{spread(diffs, 4)}.")
    if "ours" in by:
        goals += [paired_line(by["ours"], by[k], label) for k, label in (("trainer", "A"), ("processes", "B"))
                  if k in by]
    notes = [n for r in results for n in r.notes]
    per_trial = markdown_table(["method", "trial", "state", "wall s", "train+eval s", "overhead s", "eval loss",
                                "params"], [row for r in results for row in per_trial_rows(r)])
    sections = [("What ran", "\n".join(ran)), ("Results", table + "\n\n" + "\n".join(goals)),
                ("Per trial", per_trial)]
    if notes:
        sections.append(("Notes", "\n".join(f"- {n}" for n in notes)))
    return render_report("Benchmark 1: sweep throughput", env, command, sections)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_logs()
    if argv[:1] == ["child"]:
        return child_main(int(argv[1]), json.loads(argv[2]))
    args = parse_args(argv)
    workdir = make_workdir(args, "sweep")
    env, command = environment(), command_line()
    overrides = fixed_overrides(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    say(f"workdir {workdir}")
    results = []
    with GpuSampler() as gpu:
        for m in methods:
            say(f"[{time.strftime('%H:%M:%S')}] {LABELS[m]} ...")
            results.append(RUNNERS[m](args, overrides, workdir))
            free_accelerator()
            say(f"[{time.strftime('%H:%M:%S')}] {m}: {len(results[-1].trials)} trials in "
                f"{results[-1].ended - results[-1].began:.0f} s")
            write_report(args.out, build_report(args, results, gpu, env, command), final=False)
    write_report(args.out, build_report(args, results, gpu, env, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
