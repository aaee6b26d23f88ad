"""Benchmark 2: step throughput of one trial, our training loop against a plain Trainer + peft run.

For each model shape (random weights in the shape of SmolLM2-135M, Llama-3.2-1B, Llama-3-8B; NF4 base,
LoRA r=16 on all linear layers, gradient checkpointing, AdamW, cosine), the same adapter initialisation
and the same batches in the same order go through:

- ours: ``objectives.training.train_adapter`` (pads each micro-batch to its longest row);
- ours-packed: the same with ``train.packing=true`` (a step's examples share rows of data.max_length
  tokens, at most micro-batch rows per pass: the same examples per step in fewer passes);
- trainer: ``transformers.Trainer`` (its default fused AdamW) on the same peft model, computing like our
  loop (no autocast);
- trainer-bf16: the same with ``bf16=True`` (autocast), as the usual QLoRA recipe sets it;
- trainer-liger: trainer with ``use_liger_kernel=True`` (liger-kernel's patched model: fused RMSNorm, SwiGLU, RoPE
  and linear cross-entropy; CUDA only). Its patches stay on the base, so it runs after every other method of a shape;
- ours-bf16, ours-bf16-packed: our loop on a base loaded with ``model.upcast_unquantized=false``
  (embeddings, head and norms stay bf16, so activations are bf16 and sdpa gets bf16 queries, keys and
  values), padded and packed (not in the default --methods);
- the faster-step switches, each with packing, one at a time and together (``--methods switches`` runs
  them beside ours-packed): ours-cache (``model.base_cache=on``: the 4-bit base's weights kept dequantized),
  ours-fused (``train.fused_loss=on``: liger-kernel's fused linear cross-entropy, CUDA only), ours-bf16-packed,
  and ours-all (all three; the fused loss only where it can run);
- ``--methods fastest`` runs ours-packed beside: ours-cache-auto (the base cache, and checkpointing decided
  as a trial decides it: the memory-for-speed switches at fp32 activations), ours-tf32 (the same with
  ``model.tf32=true``), ours-fast (ours-cache-auto with bf16 activations and the fused loss where it runs),
  ours-fastest (ours-fast with tf32) and ours-lean (bf16 activations and the fused loss, no base
  cache, checkpointing on: the memory-for-speed switches off, as on a 24 GB GPU);
- ``--methods layers`` runs ours-packed, ours-tf32 and ours-fastest, each also with ``model.lean_layers=true``
  (LoRA layers as one autograd step, RMSNorm as one operation); ours-lean-layers is ours-lean with them. Every
  other method runs without them.
- ``--methods graphs`` runs ours-packed beside the fastest paths with the plain loss, each with and without
  ``train.cuda_graphs=on`` (a step's pass captured once per shape and replayed): ours-tf32-layers and
  ours-tf32-graphs at fp32 activations, ours-bf16-layers and ours-bf16-graphs at bf16. Every other method runs
  without graphs.
- ``--methods attention`` runs ours-packed and ours-tf32-layers beside ours-attn (the same with
  ``model.bf16_attention=true``: attention on bf16 copies of the fp32 stream's inputs, packed rows through flash's
  variable-length kernel, the default), ours-attn-mask (bf16 attention with sdpa's block-diagonal mask for packed
  rows instead) and ours-attn-graphs (with graphs too); and ours-bf16-layers beside ours-bf16-attn (with
  ``model.bf16_attention=true``: packed rows through the variable-length kernel). Every other method runs with
  sdpa's own attention.

``--checkpointing`` pins gradient checkpointing for every method (true, as Trainer + peft's recipe: the
identical configuration), or lets each of our methods decide it as a trial would (auto: off where the memory
model predicts the step fits without it; Trainer keeps it on).

Tokens/s counts real (non-padding) tokens over the steps after the warm-up steps; peak memory is the
most allocated CUDA memory during training (base weights included); share of bf16 peak is the model's
FLOPs per step (objectives.timing, without checkpointing's recomputation) per second over the device's
dense bf16 peak.

    PYTHONPATH=$PWD python bench/step_throughput.py --out $R/step_throughput.md \\
        --model-source $M
    PYTHONPATH=$PWD python bench/step_throughput.py --out $R/step_throughput_smoke.md --cpu-smoke
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import base_parser, command_line, environment, make_workdir, quiet_logs
from bench.gpu import free_accelerator
from bench.models import SHAPE_NAMES, model_overrides
from bench.report import markdown_table, num, ratio, render_report, say, write_report
from bench.trainer import loop_rows, trainer_arguments, trainer_fixed_arguments

METHODS = ("ours", "ours-packed", "trainer", "trainer-bf16", "trainer-liger", "ours-bf16", "ours-bf16-packed",
           "ours-cache", "ours-fused", "ours-all", "ours-cache-auto", "ours-fast", "ours-lean", "ours-tf32",
           "ours-fastest", "ours-packed-layers", "ours-tf32-layers", "ours-fastest-layers", "ours-lean-layers",
           "ours-tf32-graphs", "ours-bf16-layers", "ours-bf16-graphs", "ours-attn", "ours-attn-graphs",
           "ours-attn-mask", "ours-bf16-attn")
LABELS = {"ours": "ours (padded per batch)", "ours-packed": "ours, train.packing=true",
          "trainer": "Trainer + peft", "trainer-bf16": "Trainer + peft, bf16 autocast",
          "trainer-liger": "Trainer + peft, use_liger_kernel",
          "ours-bf16": "ours, upcast_unquantized=false",
          "ours-bf16-packed": "ours, upcast_unquantized=false + packing",
          "ours-cache": "ours, packing + base_cache=on", "ours-fused": "ours, packing + fused_loss=on",
          "ours-all": "ours, packing + upcast_unquantized=false + base_cache=on + fused_loss",
          "ours-cache-auto": "ours, packing + base_cache=on + checkpointing auto",
          "ours-fast": "ours, packing + upcast_unquantized=false + base_cache=on + checkpointing auto + fused_loss",
          "ours-lean": "ours, packing + upcast_unquantized=false + fused_loss, checkpointing on",
          "ours-tf32": "ours, packing + base_cache=on + checkpointing auto + tf32",
          "ours-fastest": "ours, packing + upcast_unquantized=false + base_cache=on + checkpointing auto + fused_loss "
                          "+ tf32",
          "ours-packed-layers": "ours, train.packing=true + lean_layers",
          "ours-tf32-layers": "ours, packing + base_cache=on + checkpointing auto + tf32 + lean_layers",
          "ours-fastest-layers": "ours, packing + upcast_unquantized=false + base_cache=on + checkpointing auto + "
                                 "fused_loss + tf32 + lean_layers",
          "ours-lean-layers": "ours, packing + upcast_unquantized=false + fused_loss, checkpointing on + lean_layers",
          "ours-tf32-graphs": "ours, packing + base_cache=on + checkpointing auto + tf32 + lean_layers + cuda_graphs",
          "ours-bf16-layers": "ours, packing + upcast_unquantized=false + base_cache=on + checkpointing auto + tf32 + "
                              "lean_layers",
          "ours-bf16-graphs": "ours, packing + upcast_unquantized=false + base_cache=on + checkpointing auto + tf32 + "
                              "lean_layers + cuda_graphs",
          "ours-attn": "ours, packing + base_cache=on + checkpointing auto + tf32 + lean_layers + bf16_attention",
          "ours-attn-graphs": "ours, packing + base_cache=on + checkpointing auto + tf32 + lean_layers + "
                              "bf16_attention + cuda_graphs",
          "ours-attn-mask": "ours, packing + base_cache=on + checkpointing auto + tf32 + lean_layers + "
                            "bf16_attention with sdpa's block mask",
          "ours-bf16-attn": "ours, packing + upcast_unquantized=false + base_cache=on + checkpointing auto + tf32 + "
                            "lean_layers + bf16_attention"}
# --methods switches: today's path beside each faster-step switch alone and all of them together
SWITCHES = ("ours-packed", "ours-cache", "ours-fused", "ours-bf16-packed", "ours-all")
# --methods fastest: today's path beside the switches as a trial on a large GPU decides them, and as a small one
FASTEST = ("ours-packed", "ours-cache-auto", "ours-tf32", "ours-fast", "ours-fastest", "ours-lean")
# --methods layers: each of today's path, the fastest at fp32 activations and the fastest, with and without lean layers
LAYERS = ("ours-packed", "ours-packed-layers", "ours-tf32", "ours-tf32-layers", "ours-fastest", "ours-fastest-layers")
# --methods graphs: today's path, and the fastest plain-loss paths at fp32 and bf16 activations with and without graphs
GRAPHS = ("ours-packed", "ours-tf32-layers", "ours-tf32-graphs", "ours-bf16-layers", "ours-bf16-graphs")
# --methods attention: today's path, the fastest paths with and without bf16 attention (and its block mask), and graphs
ATTENTION = ("ours-packed", "ours-tf32-layers", "ours-attn-mask", "ours-attn", "ours-attn-graphs", "ours-bf16-layers",
             "ours-bf16-attn")
GROUPS = {"switches": SWITCHES, "fastest": FASTEST, "layers": LAYERS, "graphs": GRAPHS, "attention": ATTENTION}


@dataclass(frozen=True)
class Variant:
    """How one of our methods runs: packing, the base's upcast, the base cache and the fused loss."""

    packing: bool
    upcast: bool = True
    base_cache: bool = False
    fused_loss: bool | str = False
    """True: the fused loss or no run (skipped where it cannot run); "auto": where it can run."""
    checkpointing: str | None = None
    """model.gradient_checkpointing for this method (true, false or auto); None: --checkpointing."""
    tf32: bool = False
    lean_layers: bool = False
    cuda_graphs: bool = False
    """train.cuda_graphs, where it can run (CUDA, checkpointing off as decided, the plain loss)."""
    bf16_attention: bool = False
    """model.bf16_attention: attention on bf16 copies of the fp32 stream's inputs (CUDA)."""
    varlen: bool = True
    """With bf16 attention, packed rows through flash's variable-length kernel; False: sdpa's block mask."""


OURS = {"ours": Variant(False), "ours-packed": Variant(True), "ours-bf16": Variant(False, upcast=False),
        "ours-bf16-packed": Variant(True, upcast=False), "ours-cache": Variant(True, base_cache=True),
        "ours-fused": Variant(True, fused_loss=True),
        "ours-all": Variant(True, upcast=False, base_cache=True, fused_loss="auto"),
        "ours-cache-auto": Variant(True, base_cache=True, checkpointing="auto"),
        "ours-fast": Variant(True, upcast=False, base_cache=True, fused_loss="auto", checkpointing="auto"),
        "ours-lean": Variant(True, upcast=False, fused_loss="auto", checkpointing="true"),
        "ours-tf32": Variant(True, base_cache=True, checkpointing="auto", tf32=True),
        "ours-fastest": Variant(True, upcast=False, base_cache=True, fused_loss="auto", checkpointing="auto",
                                tf32=True)}
OURS |= {f"{name}-layers": dataclasses.replace(OURS[name], lean_layers=True)
         for name in ("ours-packed", "ours-tf32", "ours-fastest", "ours-lean")}
OURS["ours-tf32-graphs"] = dataclasses.replace(OURS["ours-tf32-layers"], cuda_graphs=True)
OURS["ours-bf16-layers"] = dataclasses.replace(OURS["ours-fastest-layers"], fused_loss=False)
OURS["ours-bf16-graphs"] = dataclasses.replace(OURS["ours-bf16-layers"], cuda_graphs=True)
OURS["ours-attn"] = dataclasses.replace(OURS["ours-tf32-layers"], bf16_attention=True)
OURS["ours-attn-graphs"] = dataclasses.replace(OURS["ours-attn"], cuda_graphs=True)
OURS["ours-attn-mask"] = dataclasses.replace(OURS["ours-attn"], varlen=False)
OURS["ours-bf16-attn"] = dataclasses.replace(OURS["ours-bf16-layers"], bf16_attention=True)
# micro-batch, steps per shape: the steps keep the 8B shape's share of the run affordable
SIZES = {"tiny": (2, 4), "135m": (16, 10), "1b": (16, 10), "8b": (16, 6)}
DEFAULT_METHODS = ("ours", "ours-packed", "trainer", "trainer-bf16")
# tokens/s, peak GiB, median step seconds, mean train loss, note
Measured = tuple[float | None, float | None, float | None, float | None, str]


@dataclass
class Run:
    """One method's run on one shape."""

    shape: str
    method: str
    tokens_per_s: float | None
    peak_gib: float | None
    step_s: float | None
    mean_loss: float | None
    note: str = ""
    peak_share: float | None = None
    """Model FLOPs per second over the device's dense bf16 peak (CUDA only)."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__ or "")
    p.add_argument("--shapes", default="135m,1b,8b", help="comma-separated: 135m, 1b, 8b")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {', '.join(METHODS)}; 'switches' stands for "
                        f"{', '.join(SWITCHES)}; 'fastest' for {', '.join(FASTEST)}")
    p.add_argument("--checkpointing", choices=("true", "false", "auto"), default="true",
                   help="gradient checkpointing of every method (true: as Trainer + peft's recipe), or auto: each "
                        "of our methods decides it as a trial would")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default per shape: 10, 10, 6)")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of tokens/s")
    p.add_argument("--batch", type=int, default=None, help="micro-batch size (default 16)")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--max-length", type=int, default=512, help="data.max_length: tokens per example at most")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="all-linear")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.shapes, args.steps, args.warmup_steps, args.batch, args.max_length = "tiny", 4, 1, 2, 64
        args.methods = ",".join(METHODS)
    return args


def shape_overrides(args: argparse.Namespace, shape: str) -> list[str]:
    batch, steps = SIZES[shape]
    batch, steps = args.batch or batch, args.steps or steps
    out = [*model_overrides(shape, args.model_source, True), "search_space=none", f"train.max_steps={steps}",
           f"train.eval_every={steps}", f"train.micro_batch_size={batch}",
           f"train.grad_accum={args.grad_accum}", f"data.max_length={args.max_length}",
           f"lora.r={args.rank}", f"lora.targets={args.targets}", "optimizer.name=adamw", "optimizer.scheduler=cosine",
           # true: Trainer + peft's recipe checkpoints, the identical configuration
           f"model.gradient_checkpointing={args.checkpointing}",
           "model.base_cache=off", "train.fused_loss=off", "model.tf32=false",  # each method sets its own
           "model.bf16_attention=false"]
    return out + (["data.max_eval_examples=8"] if shape == "tiny" else [])


def steady_tokens_per_s(stamps: Sequence[float], tokens: Sequence[int], warmup: int) -> float | None:
    """Tokens of the steps after ``warmup`` over the time from the end of step ``warmup`` to the last step's end.

    ``stamps[i]`` is when step i (0-based) ended.
    """
    warmup = max(1, warmup)
    if len(stamps) <= warmup:
        return None
    span = stamps[-1] - stamps[warmup - 1]
    return sum(tokens[warmup:len(stamps)]) / span if span > 0 else None


def median_step(stamps: Sequence[float], warmup: int) -> float | None:
    gaps = [b - a for a, b in zip(stamps[max(0, warmup - 1):], stamps[max(1, warmup):], strict=False)]
    return statistics.median(gaps) if gaps else None


def _peak_reset(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def ours_config(base: Any, cfg: Any, variant: Variant) -> tuple[Any, str]:
    """The method's config with checkpointing decided as a trial decides it (``auto``), and what was decided."""
    import dataclasses

    from objectives.decisions import (
        cuda_graphs_unavailable,
        device_memory_bytes,
        resolve_checkpointing,
        with_cuda_graphs,
        with_fused_loss,
    )
    from objectives.loss import fused_loss_unavailable

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, packing=variant.packing),
                              model=dataclasses.replace(cfg.model, bf16_attention=variant.bf16_attention))
    if variant.checkpointing is not None:
        pinned = {"true": True, "false": False}.get(variant.checkpointing, variant.checkpointing)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, gradient_checkpointing=pinned))
    unavailable = fused_loss_unavailable(base.device.type, base.config)
    cfg = with_fused_loss(cfg, bool(variant.fused_loss) and unavailable is None)
    auto = cfg.model.gradient_checkpointing == "auto"
    cfg = resolve_checkpointing(cfg, base.config, device_memory_bytes(base.device), base.linear_names)
    notes = [f"checkpointing auto: {'on' if cfg.model.gradient_checkpointing else 'off'}"] if auto else []
    if variant.fused_loss == "auto" and unavailable is not None:
        notes.append(f"fused loss not run: {unavailable}")
    no_graphs = cuda_graphs_unavailable(cfg, base.device.type)
    cfg = with_cuda_graphs(cfg, variant.cuda_graphs and no_graphs is None)
    if variant.cuda_graphs and no_graphs is not None:
        notes.append(f"CUDA graphs not run: {no_graphs}")
    return cfg, "; ".join(notes)


def train_ours(base: Any, data: Any, cfg: Any, base_cache: bool, on_step: Any,
               around: contextlib.AbstractContextManager[Any] | None = None, lean_layers: bool = False,
               bf16_attention: bool = False, varlen: bool = True) -> Any:
    """One run of our loop on the resident base with ``cfg`` as decided (checkpointing resolved), the base
    cache, lean layers and bf16 attention on or off (``varlen`` off: bf16 attention masks packed rows as sdpa
    does); ``around`` (a profiler, say) is entered once the adapter is in place."""
    from objectives.training import train_adapter

    base.use_checkpointing(cfg.model.gradient_checkpointing)
    base.use_base_cache(base_cache)
    base.use_lean_layers(lean_layers)
    base.use_bf16_attention(bf16_attention)
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from objectives.attention import NAME, packed_mask

    if not varlen:
        AttentionMaskInterface.register(NAME, sdpa_mask)
    try:
        with base.adapter(cfg.lora, cfg.train.seed) as model, around or contextlib.nullcontext():
            return train_adapter(model, data, cfg.train, cfg.optimizer, base.device, base.tokenizer.pad_token_id,
                                 on_step=on_step)
    finally:
        AttentionMaskInterface.register(NAME, packed_mask)
        base.use_base_cache(False)
        base.use_bf16_attention(False)


def run_ours(base: Any, data: Any, cfg: Any, tokens: list[int], warmup: int, variant: Variant) -> Measured:
    from objectives.base import use_tf32

    cfg, note = ours_config(base, cfg, variant)
    stamps: list[float] = []
    losses: list[float] = []

    def on_step(step: int, metrics: dict[str, float]) -> None:
        stamps.append(time.perf_counter())  # the loop has synchronised: it read the loss and grad norm
        losses.append(metrics["train_loss"])

    use_tf32(variant.tf32)
    try:
        result = train_ours(base, data, cfg, variant.base_cache, on_step, lean_layers=variant.lean_layers,
                            bf16_attention=variant.bf16_attention, varlen=variant.varlen)
    finally:
        use_tf32(False)
    peak = result.peak_memory_mb / 1024 if base.device.type == "cuda" else None
    if cfg.train.cuda_graphs is True:
        note = "; ".join(filter(None, [note, f"{result.graph_replays} of {len(stamps)} steps replayed"]))
    return (steady_tokens_per_s(stamps, tokens, warmup), peak, median_step(stamps, warmup),
            statistics.fmean(losses), note)


def peak_share(base: Any, cfg: Any, tokens_per_s: float | None) -> float | None:
    """The model's FLOPs per second over the device's dense bf16 peak: per token, a micro-step's FLOPs as the time
    model counts them (base forward and input gradient, head, attention at data.max_length, adapter), without
    checkpointing's recomputed forward, so checkpointing shows as a lower share."""
    import dataclasses

    from objectives.shape import TrialSettings
    from objectives.timing import detect_device, step_flops

    if tokens_per_s is None or base.device.type != "cuda":
        return None
    settings = dataclasses.replace(TrialSettings.from_config(cfg), gradient_checkpointing=False)
    per_token = sum(step_flops(base.config, settings)) / settings.tokens
    return tokens_per_s * per_token / detect_device(cfg).bf16_flops


def unavailable_liger(device_kind: str) -> str | None:
    import importlib.util

    if device_kind != "cuda":
        return "liger-kernel's Trainer path runs on CUDA only"
    return None if importlib.util.find_spec("liger_kernel") else "liger-kernel is not installed"


def run_trainer(base: Any, cfg: Any, rows: list[dict[str, list[int]]], tokens: list[int], warmup: int,
                bf16: bool, workdir: Path, liger: bool = False) -> Measured:
    """A plain Trainer on the same peft model (same initialisation), reading the same rows in order; ``liger``:
    with ``use_liger_kernel``, which patches the base in place."""
    import torch
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from objectives.data import collate

    device = base.device
    stamps: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if device.type == "cuda":  # our loop synchronises every step too (it reads the loss)
                torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())

    base.use_checkpointing(cfg.model.gradient_checkpointing is not False)  # as prepare_model_for_kbit_training
    base.use_lean_layers(False)
    targs = TrainingArguments(**trainer_fixed_arguments(workdir / "trainer", cfg, device, bf16),
                              **trainer_arguments(cfg), logging_steps=1, use_liger_kernel=liger)
    with base.adapter(cfg.lora, cfg.train.seed) as model:
        trainer = Trainer(model=model, args=targs, train_dataset=rows,
                          data_collator=partial(collate, pad_id=base.tokenizer.pad_token_id), callbacks=[StepClock()])
        trainer.remove_callback(PrinterCallback)
        _peak_reset(device)
        trainer.train()
        peak = _peak_gib(device)
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        del trainer
    # accelerate may have wrapped the peft model's forward (autocast): start the next method from a fresh adapter
    base.release_adapter()
    return (steady_tokens_per_s(stamps, tokens, warmup), peak, median_step(stamps, warmup),
            statistics.fmean(losses) if losses else None, "")


def run_shape(args: argparse.Namespace, shape: str, methods: list[str], workdir: Path) -> tuple[list[Run], str]:
    """Every method on one shape; the bf16-stream methods get a second base, loaded after the first is gone."""
    from objectives.loss import fused_loss_unavailable
    from objectives.sources import weights_path
    from objectives.training import forward_passes
    from sweeper import compose
    from sweeper.launch import Resources

    cfg, _ = compose.load(shape_overrides(args, shape))
    start = time.perf_counter()
    weights_path(cfg.model)
    made = time.perf_counter() - start
    runs: list[Run] = []
    loaded: list[str] = []
    info = ""
    for upcast in (True, False):
        todo = [m for m in methods if (OURS[m].upcast if m in OURS else True) == upcast]
        if not todo:
            continue
        if not upcast:
            cfg, _ = compose.load([*shape_overrides(args, shape), "model.upcast_unquantized=false"])
        start = time.perf_counter()
        resources = Resources.load(cfg)
        loaded.append(f"{time.perf_counter() - start:.1f} s")
        base, data = resources.base, resources.data
        base.use_bf16_attention(False)  # Trainer + peft's attention, and ours where a method does not ask for it
        batches = loop_rows(data, cfg.train)
        accum = cfg.train.grad_accum
        tokens = [sum(len(r["input_ids"]) for rows in batches[i:i + accum] for r in rows)
                  for i in range(0, len(batches), accum)]
        padded = sum(len(rows) * max(len(r["input_ids"]) for r in rows) for rows in batches)
        passes = [forward_passes(batches[i:i + accum], True, 0, cfg.data.max_length)
                  for i in range(0, len(batches), accum)]
        rows_filled = [int(p["input_ids"].numel()) for step in passes for p in step]
        info = (f"{SHAPE_NAMES[shape]}: random weights ready in {made:.1f} s (written once, then cached), data + "
                f"load + quantize {' and '.join(loaded)}; {cfg.train.max_steps} steps of {accum} micro-batches of "
                f"{cfg.train.micro_batch_size} examples, {statistics.fmean(tokens):.0f} real tokens per step on "
                "average, padding is "
                f"{100 * (1 - sum(tokens) / padded):.0f}% of the padded batches; packed, "
                f"{len(rows_filled) / len(passes):.1f} passes per step of at most {cfg.train.micro_batch_size} x "
                f"{cfg.data.max_length} tokens, {100 * sum(tokens) / sum(rows_filled):.0f}% of their tokens real")
        for method in sorted(todo, key=lambda m: m == "trainer-liger"):  # its patches stay on the base
            say(f"[{time.strftime('%H:%M:%S')}] {shape} {method} ...")
            if method == "trainer-bf16" and base.device.type != "cuda":
                runs.append(Run(shape, method, None, None, None, None, "skipped: bf16 autocast is run on CUDA only"))
                continue
            if method == "trainer-liger" and unavailable_liger(base.device.type):
                runs.append(Run(shape, method, None, None, None, None,
                                f"skipped: {unavailable_liger(base.device.type)}"))
                continue
            unavailable = fused_loss_unavailable(base.device.type, base.config)
            if method in OURS and OURS[method].fused_loss is True and unavailable is not None:
                runs.append(Run(shape, method, None, None, None, None, f"skipped: the fused loss: {unavailable}"))
                continue
            if method in OURS:
                out = run_ours(base, data, cfg, tokens, args.warmup_steps, OURS[method])
            else:
                rows = [r for batch in batches for r in batch]
                out = run_trainer(base, cfg, rows, tokens, args.warmup_steps, method == "trainer-bf16",
                                  workdir, liger=method == "trainer-liger")
            runs.append(Run(shape, method, *out, peak_share=peak_share(base, cfg, out[0])))
            free_accelerator()
        del base, data, resources
        free_accelerator()
    return runs, info


def fastest_ours(by: dict[tuple[str, str], float | None], shape: str) -> float | None:
    measured = [v for (s, m), v in by.items() if s == shape and m.startswith("ours") and v]
    return max(measured, default=None)


def build_report(args: argparse.Namespace, runs: list[Run], infos: list[str], env: dict[str, str],
                 command: str) -> str:
    ours = {r.shape: r.tokens_per_s for r in runs if r.method == "ours"}
    today = {r.shape: r.tokens_per_s for r in runs if r.method == "ours-packed"}
    rows = [[SHAPE_NAMES[r.shape], LABELS[r.method], num(r.tokens_per_s, 0), ratio(r.tokens_per_s, ours.get(r.shape)),
             ratio(r.tokens_per_s, today.get(r.shape)), num(r.peak_gib, 2), num(r.step_s, 3), num(r.mean_loss, 4),
             "n/a" if r.peak_share is None else f"{100 * r.peak_share:.1f}%", r.note] for r in runs]
    table = markdown_table(["shape", "method", "tokens/s (real tokens)", "vs ours", "vs ours-packed", "peak GiB",
                            "step s (median)", "mean train loss", "share of bf16 peak", "note"], rows)
    by = {(r.shape, r.method): r.tokens_per_s for r in runs}
    shapes = list(dict.fromkeys(r.shape for r in runs))
    goals = ["- ours / Trainer + peft (goal: never below 1.00x): " + ", ".join(
        f"{SHAPE_NAMES[s]} {ratio(by.get((s, 'ours')), by.get((s, 'trainer')))} (vs bf16 autocast "
        f"{ratio(by.get((s, 'ours')), by.get((s, 'trainer-bf16')))})" for s in shapes),
        "- packing / padded, our loop (goal >= 1.3x on real data): " + ", ".join(
        f"{SHAPE_NAMES[s]} {ratio(by.get((s, 'ours-packed')), by.get((s, 'ours')))} (bf16 stream "
        f"{ratio(by.get((s, 'ours-bf16-packed')), by.get((s, 'ours-bf16')))})" for s in shapes),
        "- fastest of ours / Trainer + peft: " + ", ".join(
        f"{SHAPE_NAMES[s]} {ratio(fastest_ours(by, s), by.get((s, 'trainer')))}" for s in shapes),
        "- faster-step switches / ours-packed (today's path; issue goals with all of them: 8B >= 2x, 1B >= 3x): "
        + "; ".join(f"{SHAPE_NAMES[s]} " + ", ".join(
            f"{m.removeprefix('ours-')} {ratio(by.get((s, m)), by.get((s, 'ours-packed')))}"
            for m in METHODS if m.startswith("ours-") and m != "ours-packed" and (s, m) in by) for s in shapes)]
    ran = [f"- {i}" for i in infos] + [
        f"- Tokens/s leaves out the first {args.warmup_steps} steps of each run (warm-up) and counts real tokens "
        "only; every method sees the same examples in the same order (the batches our loop draws with seed 0), "
        "the same LoRA initialisation (seed 0) and the same optimizer settings (AdamW, lr 2e-4, warmup 10%, "
        "cosine, clipping at 1.0).",
        "- The data are the stdlib pairs (short: most examples are under 100 tokens), so batches are far from the "
        f"{args.max_length}-token limit; tokens/s here is lower than with full-length synthetic batches.",
        "- Packing (train.packing=true) puts a step's examples into rows of data.max_length tokens (first fit by "
        "decreasing length), at most micro_batch_size rows per forward pass, so a pass never holds more tokens "
        "than a padded micro-batch could; position ids restart per example and transformers builds a "
        "block-diagonal mask from them for sdpa. The same examples and loss per step in fewer passes: mean "
        "train loss next to ours' checks that it trains on the same thing.",
        "- Trainer logs every step (logging_steps=1), as QLoRA recipes often do; a TrainerCallback stamps each "
        "step's end after a CUDA synchronisation (our loop synchronises every step when it reads the loss).",
        "- Peak memory: torch.cuda.max_memory_allocated during training, base weights included (and with "
        "model.base_cache=on the base's dequantized copy).",
        "- Share of bf16 peak: real tokens/s times the model's FLOPs per token (objectives.timing.step_flops: "
        "the base's forward and input gradient, head, attention at data.max_length, adapter; no recomputation) "
        "over the device's dense bf16 peak (objectives.timing.PEAK_FLOPS).",
        f"- Gradient checkpointing: {args.checkpointing} (--checkpointing).",
        "- Random weights: objectives.sources.random_model_dir writes each shape once (16 GB for 8B) before loading.",
    ]
    return render_report("Benchmark 2: step throughput of one trial", env, command,
                         [("What ran", "\n".join(ran)), ("Results", table + "\n\n" + "\n".join(goals))])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs()
    workdir = make_workdir(args, "steps")
    env, command = environment(), command_line()
    methods = list(dict.fromkeys(n for m in args.methods.split(",") if m.strip()
                                 for n in GROUPS.get(m.strip(), (m.strip(),))))
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    runs: list[Run] = []
    infos: list[str] = []
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        if shape not in SIZES:
            raise SystemExit(f"--shapes: unknown {shape!r}; choose from 135m, 1b, 8b")
        shape_runs, info = run_shape(args, shape, methods, workdir)
        runs += shape_runs
        infos.append(info)
        # each shape's table is written as soon as it exists: a later shape that fails loses only itself
        write_report(args.out, build_report(args, runs, infos, env, command), final=False)
    write_report(args.out, build_report(args, runs, infos, env, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
