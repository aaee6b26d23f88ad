"""Packing parity: the same trial trained on packed and on padded batches, over several training seeds.

Every trial of a sweep trains with one seed (``train.seed``: the adapter's initialisation, the data order
and the LoRA dropout masks). Two layouts of the same examples, packed rows or padded rows, draw their
dropout masks over tensors of different shapes, so each layout meets one fixed dropout realisation, and
it is the same realisation in every trial. Comparing two methods over the trials of one sweep therefore
compares two dropout draws, not two independent samples per trial. This benchmark varies the seed
instead: per configuration, packed - padded eval loss over seeds, with dropout on (the default) and off
(where the two layouts compute the same sums and differ only in bf16 rounding).

Our loop on padded batches computes exactly what ``Trainer`` + peft computes (benchmark 1 shows equal
losses trial by trial), so this is also the question of whether packing changes the loss against A.

    PYTHONPATH=$PWD python bench/packing_parity.py --model-source $M \\
        --out $R/packing_parity.md                                      # ~6 min on one H200
    PYTHONPATH=$PWD python bench/packing_parity.py --out $R/p.md --cpu-smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.common import base_parser, command_line, environment, quiet_logs
from bench.models import model_label, model_overrides
from bench.report import markdown_table, render_report, say, write_report

# The two best kinds of trial in benchmark 1's sweep: its best AdamW configuration and a typical SGD one.
CONFIGS = {
    "AdamW lr 0.0019, r 32, all-linear": ["optimizer.name=adamw", "optimizer.lr=0.0019", "lora.r=32",
                                          "lora.targets=all-linear"],
    "SGD lr 0.0075, momentum 0.8, r 16, all-linear": ["optimizer.name=sgd", "optimizer.lr=0.00753",
                                                      "optimizer.momentum=0.802", "lora.r=16",
                                                      "lora.targets=all-linear"],
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__ or "")
    p.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9", help="training seeds, each trained both ways")
    p.add_argument("--no-dropout-seeds", default="0,1,2",
                   help="seeds also trained with lora.dropout=0 (empty: none)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per trial (eval once, at the end)")
    p.add_argument("--batch", type=int, default=16, help="micro-batch size")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.seeds, args.no_dropout_seeds, args.steps, args.batch = "0,1", "0", 2, 2
    return args


def seeds(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean with a 95% t interval (the interval is the mean itself for one value)."""
    from scipy.stats import t

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, m, m
    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def summary(diffs: Sequence[float]) -> str:
    m, lo, hi = mean_interval(diffs)
    lower = sum(d < 0 for d in diffs)
    return f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]; packed lower in {lower} of {len(diffs)}"


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (configuration, dropout, seed): eval loss packed and padded."""
    from objectives.training import train_adapter
    from sweeper import compose
    from sweeper.launch import Resources

    fixed = [*model_overrides("tiny" if args.cpu_smoke else "135m", args.model_source, False),
             "search_space=none", f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
             f"train.micro_batch_size={args.batch}", "optimizer.scheduler=cosine",
             "model.bf16_attention=false"]  # Trainer + peft's attention
    if args.cpu_smoke:
        fixed += ["data.max_length=64", "data.max_eval_examples=8"]
    resources = None
    rows = []
    for name, values in CONFIGS.items():
        for dropout, seed_list in ((None, seeds(args.seeds)), (0.0, seeds(args.no_dropout_seeds))):
            extra = [] if dropout is None else [f"lora.dropout={dropout}"]
            cfg, _ = compose.load([*fixed, *values, *extra])
            resources = resources or Resources.load(cfg)
            base = resources.base
            base.use_checkpointing(False)  # as benchmark 1's trials: the 135M model fits without it
            for seed in seed_list:
                losses = {}
                for packing in (True, False):
                    train = dataclasses.replace(cfg.train, packing=packing, seed=seed)
                    start = time.perf_counter()
                    with base.adapter(cfg.lora, seed) as model:
                        result = train_adapter(model, resources.data, train, cfg.optimizer, base.device,
                                               base.tokenizer.pad_token_id)
                    losses[packing] = result.eval_loss
                    say(f"{name} dropout={cfg.lora.dropout} seed={seed} packing={packing}: "
                        f"{result.eval_loss:.4f} ({time.perf_counter() - start:.1f} s)")
                rows.append({"config": name, "dropout": cfg.lora.dropout, "seed": seed,
                             "packed": losses[True], "padded": losses[False]})
    return rows


def build_report(args: argparse.Namespace, rows: list[dict[str, Any]], env: dict[str, str], command: str) -> str:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["dropout"]), []).append(r)
    summary_rows = [[name, dropout, len(g), f"{statistics.fmean(r['packed'] for r in g):.4f}",
                     f"{statistics.fmean(r['padded'] for r in g):.4f}",
                     summary([r["packed"] - r["padded"] for r in g])]
                    for (name, dropout), g in groups.items()]
    what = (f"- Model: {model_label(args.cpu_smoke, 'real')}, NF4 base, gradient checkpointing off; data: the "
            f"stdlib pairs; {args.steps} steps x {args.batch} examples, cosine schedule with warmup, eval once at "
            "the end on the same held-out set, in the layout the trial trained with.\n"
            "- Per seed, both layouts start from the same adapter weights and read the same examples in the "
            "same order; only the dropout masks (drawn over tensors of different shapes) and the bf16 rounding "
            "differ.\n- Intervals: 95% t intervals of the mean over seeds.")
    per_seed = [[r["config"], r["dropout"], r["seed"], f"{r['packed']:.4f}", f"{r['padded']:.4f}",
                 f"{r['packed'] - r['padded']:+.4f}"] for r in rows]
    return render_report("Packing parity: packed against padded batches over training seeds", env, command, [
        ("What ran", what),
        ("Results", markdown_table(["configuration", "lora.dropout", "seeds", "packed: mean eval loss",
                                    "padded: mean eval loss", "packed - padded: mean [95% interval]"],
                                   summary_rows)),
        ("Per seed", markdown_table(["configuration", "lora.dropout", "seed", "packed", "padded",
                                     "packed - padded"], per_seed)),
    ])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs()
    env, command = environment(), command_line()
    rows = run(args)
    write_report(args.out, build_report(args, rows, env, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
