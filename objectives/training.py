"""One adapter's training loop: optimizer, schedule, accumulation, periodic evaluation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from objectives.attention import on_device
from objectives.base import current_device
from objectives.config import OptimizerConfig, TrainConfig
from objectives.data import (
    Rows,
    TokenizedSplits,
    collate,
    eval_micro_batches,
    pack,
    targets_in,
    train_micro_batches,
)
from objectives.loss import fused_loss_on, pass_loss
from objectives.step_graphs import PassGraphs


class LossNotFinite(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainResult:
    """What a finished training run measured."""

    eval_loss: float
    steps: int
    trainable_params: int
    peak_memory_mb: float
    seconds: float
    """Wall time inside training and evaluation steps (excludes setup and logging)."""
    graph_replays: int = 0
    """Passes replayed from a CUDA graph (``train.cuda_graphs``)."""


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        # One kernel for all the small adapter tensors on CUDA (what Trainer's default optimizer does).
        fused = all(p.device.type == "cuda" for p in params) or None
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]),
                                 weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def lr_lambda(cfg: OptimizerConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warmup from 0, then cosine, linear or constant down to the end of training, as transformers'
    ``get_*_schedule_with_warmup`` with a Trainer's ``warmup_ratio``: a recipe's settings mean the same here.
    The first step's rate is 0, a gentler start than ``lr / (warmup + 1)``, which reached a higher eval loss at
    large learning rates (BENCHMARKS.md, benchmark 1)."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.scheduler == "linear":
            return 1.0 - progress
        return 1.0

    return factor


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def forward_passes(micro_batches: list[Rows], packing: bool, pad_id: int, width: int,
                   one_row: bool = False) -> list[dict[str, torch.Tensor]]:
    """One step's micro-batches as padded batches, or with packing as few passes as fit the same rows (``one_row``:
    each pass's rows end to end in one, :func:`objectives.data.pack`)."""
    if not packing:
        return [collate(rows, pad_id) for rows in micro_batches]
    return pack([r for rows in micro_batches for r in rows], pad_id, width, len(micro_batches[0]), one_row)


def eval_passes(data: TokenizedSplits, batch_size: int, packing: bool, pad_id: int,
                one_row: bool = False) -> list[dict[str, torch.Tensor]]:
    """The held-out set as forward passes, built once per trial."""
    return forward_passes(list(eval_micro_batches(data.eval, batch_size)), packing, pad_id, data.max_length, one_row)


def evaluates_at(step: int, eval_every: int, max_steps: int) -> bool:
    """Whether :func:`train_adapter` evaluates after ``step``: every ``eval_every`` steps and after the last.

    A progress display reads it to announce the evaluation before it starts.
    """
    return step % eval_every == 0 or step == max_steps


@torch.no_grad()
def evaluate(model: Any, passes: list[dict[str, torch.Tensor]], device: torch.device, fused: bool = False) -> float:
    """Mean loss per response token over the held-out passes (token-weighted across passes); ``fused``: the
    loss fused with the output head (:mod:`objectives.loss`)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    try:
        for batch in passes:
            n = targets_in(batch)
            if n:
                total += pass_loss(model, on_device(model, batch, device), n, fused).float() * n
                count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation set has no response tokens")
    return float(total) / count


def train_adapter(
    model: Any,
    data: TokenizedSplits,
    train: TrainConfig,
    optim: OptimizerConfig,
    device: torch.device,
    pad_id: int,
    on_step: Callable[[int, dict[str, float]], None] = lambda step, metrics: None,
    on_eval: Callable[[int, float], None] = lambda step, loss: None,
) -> TrainResult:
    """Train the model's trainable parameters; ``on_eval`` may raise to stop (pruning).

    The loop reads from the device once per step (the loss and gradient norm, together), not once per
    forward pass. ``train.fused_loss`` (``auto``: where it can run) computes the loss fused with the output head.

    Raises:
        LossNotFinite: the loss or the gradient norm became NaN or infinite (before that step's update), or an
            evaluation did (after ``on_eval`` saw it).
    """
    # Triton's kernels (the fused loss) launch on the current device, not on their tensors'.
    with current_device(device):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, optim)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, train.max_steps))
        micro_batches = train_micro_batches(data.train, train.micro_batch_size, train.seed)
        held_out = eval_passes(data, train.micro_batch_size, train.packing, pad_id)
        max_norm = train.max_grad_norm if train.max_grad_norm > 0 else math.inf
        fused = fused_loss_on(train.fused_loss, device, model)
        graphs = PassGraphs(model, params, device, data.max_length, pad_id) if train.cuda_graphs is True else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        model.train()
        busy = 0.0
        eval_loss = math.nan
        peak = 0.0
        try:
            for step in range(1, train.max_steps + 1):
                start = time.perf_counter()
                window = [next(micro_batches) for _ in range(train.grad_accum)]
                passes = forward_passes(window, train.packing, pad_id, data.max_length)
                # Every response token of the step weighs the same, however the step is split into passes:
                # halving the micro-batch after an out-of-memory error, or packing, leaves the objective unchanged.
                targets = sum(targets_in(batch) for batch in passes)
                loss_sum = torch.zeros((), device=device)
                if graphs is not None and len(passes) == 1:  # a graph's pass writes gradients; it cannot add to them
                    loss_sum += graphs.loss(passes[0], targets)
                else:
                    for batch in passes:
                        loss = pass_loss(model, on_device(model, batch, device), targets, fused)
                        loss.backward()
                        loss_sum += loss.detach().float()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                train_loss, norm = torch.stack([loss_sum, grad_norm.float()]).tolist()
                if not math.isfinite(train_loss):
                    raise LossNotFinite(f"loss is {train_loss} at step {step}")
                if not math.isfinite(norm):
                    raise LossNotFinite(f"gradient norm is {norm} at step {step} (loss {train_loss:.4f})")
                lr = float(scheduler.get_last_lr()[0])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                elapsed = time.perf_counter() - start
                busy += elapsed
                peak = max(peak, peak_memory_mb(device))
                tokens = sum(len(r["input_ids"]) for rows in window for r in rows)
                on_step(step, {"train_loss": train_loss, "learning_rate": lr, "grad_norm": norm,
                               "tokens_per_s": tokens / elapsed, "peak_memory_mb": peak})
                if evaluates_at(step, train.eval_every, train.max_steps):
                    start = time.perf_counter()
                    eval_loss = evaluate(model, held_out, device, fused)
                    busy += time.perf_counter() - start
                    on_eval(step, eval_loss)
                    if not math.isfinite(eval_loss):
                        raise LossNotFinite(f"eval loss is {eval_loss} at step {step}")
        finally:
            if graphs is not None:
                graphs.close()
        return TrainResult(eval_loss=eval_loss, steps=train.max_steps,
                           trainable_params=sum(p.numel() for p in params), peak_memory_mb=peak,
                           seconds=busy, graph_replays=graphs.replays if graphs is not None else 0)
