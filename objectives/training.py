"""One adapter's training loop: optimizer, schedule, accumulation, periodic evaluation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from objectives.data import TokenizedSplits, eval_batches, train_batches
from sweeper.config import OptimizerConfig, TrainConfig


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


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]),
                                 weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def lr_lambda(cfg: OptimizerConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warmup from 0, then cosine, linear or constant down to the end of training."""
    warmup = int(round(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
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


@torch.no_grad()
def evaluate(model: Any, data: TokenizedSplits, batch_size: int, pad_id: int, device: torch.device) -> float:
    """Mean loss per response token over the held-out set (token-weighted across batches)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in eval_batches(data.eval, batch_size, pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n:
                total += float(model(**batch).loss) * n
                count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation set has no response tokens")
    return total / count


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

    Raises:
        LossNotFinite: the loss became NaN or infinite.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, train.max_steps))
    batches = train_batches(data.train, train.micro_batch_size, train.seed, pad_id)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    busy = 0.0
    eval_loss = math.nan
    peak = 0.0
    for step in range(1, train.max_steps + 1):
        start = time.perf_counter()
        loss_sum, tokens = 0.0, 0
        window = [next(batches) for _ in range(train.grad_accum)]
        # Every response token of the step weighs the same, however the step is split into micro-batches:
        # halving the micro-batch after an out-of-memory error leaves the objective unchanged.
        targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
        for cpu_batch in window:
            batch = {k: v.to(device) for k, v in cpu_batch.items()}
            loss = model(**batch, num_items_in_batch=targets).loss
            if not torch.isfinite(loss):
                raise LossNotFinite(f"loss is {float(loss)} at step {step}")
            loss.backward()
            loss_sum += float(loss.detach())
            tokens += int(batch["attention_mask"].sum())
        max_norm = train.max_grad_norm if train.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        lr = float(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        busy += elapsed
        peak = max(peak, peak_memory_mb(device))
        on_step(step, {"train_loss": loss_sum, "learning_rate": lr, "grad_norm": grad_norm,
                       "tokens_per_s": tokens / elapsed, "peak_memory_mb": peak})
        if step % train.eval_every == 0 or step == train.max_steps:
            start = time.perf_counter()
            eval_loss = evaluate(model, data, train.micro_batch_size, pad_id, device)
            busy += time.perf_counter() - start
            on_eval(step, eval_loss)
    return TrainResult(eval_loss=eval_loss, steps=train.max_steps,
                       trainable_params=sum(p.numel() for p in params), peak_memory_mb=peak,
                       seconds=busy)
