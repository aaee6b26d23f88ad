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

    PYTHONPATH=$PWD python bench/sweep_throughput.py --out $R/sweep_throughput.md \\
        --model-source $M
    PYTHONPATH=$PWD python bench/sweep_throughput.py --out $R/sweep_throughput_smoke.md --cpu-smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from bench.common import base_parser, command_line, environment, make_workdir, quiet_logs
from bench.gpu import GpuSampler, free_accelerator
from bench.models import model_overrides
from bench.report import say, write_report
from bench.sweep_methods import METHODS, RUNNERS, child_main
from bench.sweep_report import LABELS, build_report


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
    out = [*model_overrides(shape, args.model_source, args.weights == "random"), "model.bf16_attention=false",
           f"train.max_steps={args.steps}", f"train.eval_every={args.steps}", f"train.micro_batch_size={args.batch}",
           "optimizer.scheduler=cosine", "study/sampler=tpe", f"study.sampler.seed={args.seed}", "study/pruner=none",
           f"train.seed={args.train_seed}"]
    if args.cpu_smoke:
        out += ["data.max_length=64", "data.max_eval_examples=8"]
    return out


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
