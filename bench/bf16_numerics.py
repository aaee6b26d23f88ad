"""How much bf16 activations move a trial's losses, against the mixed precision the usual QLoRA recipe runs.

One default trial on the real model (packing, the default trial's settings, no dropout so that the runs
differ only in arithmetic), three ways from the same adapter initialisation and examples:

- today: the fp32 activation stream (peft's k-bit preparation upcasts embeddings, head and norms);
- again: today's run repeated, the device's own run-to-run difference (CUDA's kernels are not all
  deterministic);
- tf32: today's run with ``model.tf32=true``, fp32 products on TensorFloat-32;
- attention: tf32 with ``model.bf16_attention=true`` (the defaults): attention on bf16 copies of the fp32
  stream's queries, keys and values, as autocast runs it (CUDA only; on the CPU the same as tf32);
- autocast: the same loop under ``torch.autocast(dtype=bfloat16)``, the mixed precision that Trainer's
  ``bf16=True`` (the usual QLoRA recipe) runs: matrix products in bf16, the residual stream and norms in fp32;
- bf16: ``model.upcast_unquantized=false``, every activation in bf16.

The autocast run is the yardstick: a difference to today's losses no larger than autocast's is within the
bf16 noise the usual recipe accepts.

    PYTHONPATH=$PWD python bench/bf16_numerics.py --out $R/bf16_numerics.md
    PYTHONPATH=$PWD python bench/bf16_numerics.py --cpu-smoke --out $R/bf16_numerics_smoke.md
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.common import base_parser, command_line, environment, quiet_logs
from bench.gpu import free_accelerator
from bench.models import model_overrides
from bench.report import markdown_table, num, render_report, say, write_report

VARIANTS = ("today", "again", "tf32", "attention", "autocast", "bf16")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__ or "")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.steps = 3
    return args


def overrides(args: argparse.Namespace, variant: str) -> list[str]:
    model = model_overrides("tiny", None, True) if args.cpu_smoke else (
        [f"model.source={args.model_source}"] if args.model_source else [])
    return [*model, "search_space=none", f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
            "lora.dropout=0", "model.base_cache=off", "train.fused_loss=off",
            f"model.upcast_unquantized={'false' if variant == 'bf16' else 'true'}",
            f"model.bf16_attention={'true' if variant == 'attention' else 'false'}",
            *(["data.max_length=64", "data.max_eval_examples=8"] if args.cpu_smoke else [])]


def run(cfg: Any, variant: str, resources: Any) -> tuple[list[float], float, float]:
    """Per-step train losses, the final eval loss and the seconds the training took."""
    import torch

    from objectives.base import use_tf32
    from objectives.training import train_adapter

    base = resources.base
    losses: list[float] = []
    autocast = torch.autocast(base.device.type, dtype=torch.bfloat16) if variant == "autocast" \
        else contextlib.nullcontext()
    start = time.perf_counter()
    use_tf32(variant in ("tf32", "attention"))
    base.use_bf16_attention(variant == "attention")
    try:
        with base.adapter(cfg.lora, cfg.train.seed) as model, autocast:
            result = train_adapter(model, resources.data, cfg.train, cfg.optimizer, base.device,
                                   base.tokenizer.pad_token_id, on_step=lambda s, m: losses.append(m["train_loss"]))
    finally:
        use_tf32(False)
        base.use_bf16_attention(False)
    return losses, result.eval_loss, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs()
    from sweeper import compose
    from sweeper.launch import Resources

    runs: dict[str, tuple[list[float], float, float]] = {}
    loaded: dict[bool, Any] = {}  # every run but bf16 shares one loaded base
    for variant in VARIANTS:
        say(f"[{time.strftime('%H:%M:%S')}] {variant} ...")
        cfg, _ = compose.load(overrides(args, variant))
        upcast = cfg.model.upcast_unquantized
        if upcast not in loaded:
            loaded.clear()
            free_accelerator()
            loaded[upcast] = Resources.load(cfg)
        runs[variant] = run(cfg, variant, loaded[upcast])
    today, today_eval, _ = runs["today"]
    per_step = markdown_table(["step", *VARIANTS], [[str(i + 1), *(num(runs[v][0][i], 4) for v in VARIANTS)]
                                                    for i in range(len(today))])
    rows = []
    for v in VARIANTS:
        losses, eval_loss, seconds = runs[v]
        diffs = [abs(a - b) / b for a, b in zip(losses, today, strict=True)]
        rows.append([v, f"{100 * max(diffs):.2f}%", f"{100 * sum(diffs) / len(diffs):.2f}%", num(eval_loss, 4),
                     f"{100 * (eval_loss - today_eval) / today_eval:+.2f}%", num(seconds, 1)])
    summary = markdown_table(["run", "largest per-step difference to today", "mean per-step difference",
                              "eval loss", "eval loss vs today", "training s"], rows)
    what = (f"{'tiny random model (CPU smoke: numbers mean nothing)' if args.cpu_smoke else 'the default model'}, "
            f"the default trial's settings, {args.steps} steps, dropout 0, packing; differences are relative.")
    title = "bf16 activations and TF32: losses against today's and autocast's"
    write_report(args.out, render_report(title, environment(), command_line(argv),
                                         [("What ran", what), ("Summary", summary), ("Per-step train loss", per_step)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
