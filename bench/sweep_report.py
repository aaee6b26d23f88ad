"""Benchmark 1's report: what ran, the table per method, ours against each baseline, and every trial."""

from __future__ import annotations

import argparse

from bench.gpu import GpuSampler
from bench.models import model_label
from bench.report import markdown_table, num, percent, ratio, render_report, spread
from bench.sweep_methods import SPACE
from bench.sweep_results import MethodResult, best_of_first, median_busy, paired_differences, paired_speedup
from bench.timing import trial_walls

TARGET_RUN = "24+ trials of about 60 s of training each on the default model, pruning off"
TARGET_TRIAL_S = 60.0
LABELS = {"ours": "ours (one process, base loaded once)",
          "ours-ckpt": "ours, checkpointing always on (as A)",
          "ours-padded": "ours, padded batches (as A)",
          "shared": "ours, workers sharing the GPU (workers.per_gpu)",
          "trainer": "A: Trainer.hyperparameter_search + model_init",
          "processes": "B: fresh process per trial"}


def result_row(r: MethodResult, gpu: GpuSampler) -> list[str]:
    m = r.measured
    busy = [t.busy for t in m if t.busy is not None]
    window = r.window
    warmup = f"+{r.workers} warm-up" if r.workers > 1 else "+1 warm-up"
    return [LABELS[r.key], f"{len(m)} ({warmup})", num(r.per_hour, 0), spread(r.overheads), spread(busy),
            percent(gpu.busy_fraction(*window) if window else None), num(r.best_loss, 4)]


def paired_line(ours: MethodResult, reference: MethodResult, label: str) -> str:
    """The measured and the projected paired speedup of ours over a baseline, as a report line."""
    measured, projected = paired_speedup(ours, reference), paired_speedup(ours, reference, TARGET_TRIAL_S)
    if measured is None or projected is None:
        return f"- Trials both ours and {label} ran with the same parameters: none (warm-up excluded)."
    return (f"- Trials both ours and {label} ran with the same parameters ({measured[0]}, warm-up excluded): ours / "
            f"{label} trials per hour on that same work {measured[1]:.2f}x. Projection, not a measurement: with each "
            f"pair's training and evaluation scaled so that {label}'s takes {TARGET_TRIAL_S:.0f} s, overheads as "
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
    ran = [f"- Target: {TARGET_RUN}. Ran: " + "; ".join(
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
