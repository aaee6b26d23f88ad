"""Where one trial's step goes: the CUDA kernels and the host's operators of a few steps under torch.profiler.

Each ``--variants`` entry is one way our loop runs the same steps (same examples, adapter initialisation and
optimizer): packing always, and a ``+``-joined set of switches:

- ``cache``: ``model.base_cache=on``; ``bf16``: ``model.upcast_unquantized=false``; ``fused``:
  ``train.fused_loss=on``; ``tf32``: ``model.tf32=true``; ``layers``: ``model.lean_layers=true``; ``attn``:
  ``model.bf16_attention=true``; ``nockpt``:
  gradient checkpointing off (``ckpt`` on; ``auto`` is the default); ``today``: none of them.

For each variant the report gives the wall time per step, the GPU's kernel time per step (its share of the
wall time is how busy the device was), and the kernels and host operators that take the most time.

    PYTHONPATH=$PWD python bench/step_profile.py --model-source $M --shape 8b --batch 4 --grad-accum 7 \\
        --max-length 1024 --variants today,cache,cache+nockpt,bf16+cache+nockpt --out $R/profile_8b.md
    PYTHONPATH=$PWD python bench/step_profile.py --cpu-smoke --out $R/profile_smoke.md
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.common import base_parser, command_line, environment, quiet_logs
from bench.gpu import free_accelerator
from bench.models import SHAPE_NAMES, model_overrides
from bench.report import markdown_table, num, render_report, say, write_report
from bench.step_throughput import median_step, train_ours

SWITCHES = {"today", "cache", "bf16", "fused", "nockpt", "ckpt", "tf32", "layers", "attn"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__ or "")
    p.add_argument("--shape", default="135m", choices=["135m", "1b", "8b"])
    p.add_argument("--variants", default="today,cache", help="comma-separated; each a +-joined set of "
                                                               f"{', '.join(sorted(SWITCHES))}")
    p.add_argument("--steps", type=int, default=3, help="profiled steps per variant")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="qkvo")
    p.add_argument("--top", type=int, default=12, help="kernels and host operators listed per variant")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.steps, args.warmup_steps, args.max_length, args.variants = 2, 1, 64, "today,cache,nockpt"
    return args


def overrides(args: argparse.Namespace, switches: set[str]) -> list[str]:
    shape = "tiny" if args.cpu_smoke else args.shape
    steps = args.warmup_steps + args.steps
    ckpt = "false" if "nockpt" in switches else "true" if "ckpt" in switches else "auto"
    out = [*model_overrides(shape, args.model_source, True), "search_space=none", f"train.max_steps={steps}",
           f"train.eval_every={steps}", f"train.micro_batch_size={args.batch}", f"train.grad_accum={args.grad_accum}",
           f"data.max_length={args.max_length}", f"lora.r={args.rank}", f"lora.targets={args.targets}",
           "train.packing=true", f"model.gradient_checkpointing={ckpt}",
           f"model.base_cache={'on' if 'cache' in switches else 'off'}",
           f"train.fused_loss={'on' if 'fused' in switches else 'off'}",
           f"model.upcast_unquantized={'false' if 'bf16' in switches else 'true'}",
           f"model.tf32={'true' if 'tf32' in switches else 'false'}",
           f"model.lean_layers={'true' if 'layers' in switches else 'false'}",
           f"model.bf16_attention={'true' if 'attn' in switches else 'false'}"]
    return out + (["data.max_eval_examples=8"] if shape == "tiny" else [])


def top_rows(events: Any, key: str, steps: int, top: int) -> list[list[str]]:
    ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    return [[e.key[:90], num(getattr(e, key) / 1e3 / steps, 2), str(e.count // steps)] for e in ranked]


def profile_variant(args: argparse.Namespace, name: str, resources: Any, cfg: Any) -> dict[str, Any]:
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    from objectives.base import use_tf32
    from objectives.decisions import device_memory_bytes, resolve_checkpointing

    base, data = resources.base, resources.data
    cfg = resolve_checkpointing(cfg, base.config, device_memory_bytes(base.device), base.linear_names)
    cuda = base.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    stamps: list[float] = []
    prof = profile(activities=activities,
                   schedule=schedule(wait=0, warmup=args.warmup_steps - 1, active=args.steps, repeat=1))

    def on_step(step: int, metrics: dict[str, float]) -> None:
        stamps.append(time.perf_counter())
        prof.step()

    use_tf32(cfg.model.tf32)
    try:
        train_ours(base, data, cfg, cfg.model.base_cache is True, on_step, around=prof,
                   lean_layers=cfg.model.lean_layers, bf16_attention=cfg.model.bf16_attention)
    finally:
        use_tf32(False)
    events = prof.key_averages()
    # the profiler's own step ranges show up as device events too: they are spans, not kernels
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.key.startswith("ProfilerStep")]
    host = [e for e in events if e.device_type == DeviceType.CPU and not e.key.startswith("ProfilerStep")]
    wall = median_step(stamps, args.warmup_steps) or float("nan")
    kernel_s = sum(e.self_device_time_total for e in kernels) / 1e6 / args.steps if cuda else None
    return {
        "variant": name, "checkpointing": cfg.model.gradient_checkpointing, "wall": wall, "kernel": kernel_s,
        "peak": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "kernels": top_rows(kernels, "self_device_time_total", args.steps, args.top) if cuda else [],
        "host": top_rows(host, "self_cpu_time_total", args.steps, args.top),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs()
    import torch

    from sweeper import compose
    from sweeper.launch import Resources

    results: list[dict[str, Any]] = []
    loaded: dict[bool, Any] = {}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        switches = set(name.split("+"))
        if switches - SWITCHES:
            raise SystemExit(f"--variants: unknown {sorted(switches - SWITCHES)}; choose from {sorted(SWITCHES)}")
        cfg, _ = compose.load(overrides(args, switches))
        upcast = cfg.model.upcast_unquantized
        if upcast not in loaded:
            loaded.clear()
            free_accelerator()
            loaded[upcast] = Resources.load(dataclasses.replace(cfg, model=dataclasses.replace(
                cfg.model, base_cache=False)))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        say(f"[{time.strftime('%H:%M:%S')}] {name} ...")
        results.append(profile_variant(args, name, loaded[upcast], cfg))
        r = results[-1]
        say(f"  wall {r['wall']:.3f} s/step, kernels {num(r['kernel'], 3)} s/step, peak {num(r['peak'], 2)} GiB")
    summary = markdown_table(
        ["variant", "checkpointing", "wall s/step", "GPU kernel s/step", "GPU busy", "peak GiB"],
        [[r["variant"], str(r["checkpointing"]), num(r["wall"], 3), num(r["kernel"], 3),
          "n/a" if r["kernel"] is None else f"{100 * r['kernel'] / r['wall']:.0f}%", num(r["peak"], 2)]
         for r in results])
    sections = [("Per variant", summary)]
    for r in results:
        head = ["name", "ms per step", "calls per step"]
        body = (("GPU kernels\n\n" + markdown_table(head, r["kernels"]) + "\n\n") if r["kernels"] else "") + \
            "Host operators (self time)\n\n" + markdown_table(head, r["host"])
        sections.append((f"{r['variant']}", body))
    what = (f"{SHAPE_NAMES['tiny' if args.cpu_smoke else args.shape]}, random weights, NF4, LoRA r={args.rank} "
            f"{args.targets}, packed rows of {args.max_length} tokens, {args.grad_accum} x {args.batch} examples per "
            f"step; {args.warmup_steps} warm-up steps, then {args.steps} steps under torch.profiler (which adds "
            "host time: read the wall times as relative).")
    write_report(args.out, render_report("Step profile", environment(), command_line(argv),
                                         [("What ran", what), *sections]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
