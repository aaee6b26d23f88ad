"""Every slot's own optimizer, schedule and gradient clipping, applied to stacked adapter weights at once.

The weights of all slots live in shared tensors whose first dimension is the slot, so one update serves
them all; each slot keeps its own hyperparameters, step count and state, and the arithmetic per element is
torch's (``torch.optim.AdamW`` and ``torch.optim.SGD``, single-tensor path): a slot trains as that optimizer
would train its adapter alone. A slot that is not stepped keeps its weights and state untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from objectives.config import OptimizerConfig
from objectives.training import lr_lambda


class SlotOptimizer:
    """AdamW or SGD (momentum, Nesterov, weight decay) per slot, over ``params`` shaped (slots, ...)."""

    EPS = 1e-8

    def __init__(self, params: list[torch.nn.Parameter], slots: int) -> None:
        self.params = params
        self.slots = slots
        device = params[0].device
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.configs: list[OptimizerConfig | None] = [None] * slots
        self.schedules: list[Callable[[int], float]] = [lambda step: 0.0] * slots
        self.total_steps = [0] * slots
        self.steps = [0] * slots
        self.device = device

    def reset(self, slot: int, cfg: OptimizerConfig, total_steps: int) -> None:
        """A new trial in ``slot``: fresh state, its own schedule over ``total_steps``."""
        for buf in (*self.exp_avg, *self.exp_avg_sq):
            buf[slot].zero_()
        self.configs[slot] = cfg
        self.schedules[slot] = lr_lambda(cfg, total_steps)
        self.total_steps[slot] = total_steps
        self.steps[slot] = 0

    def lr(self, slot: int) -> float:
        """The rate of the slot's next step (what a LambdaLR reports before stepping)."""
        cfg = self.configs[slot]
        assert cfg is not None
        return cfg.lr * self.schedules[slot](self.steps[slot])

    def grad_norms(self) -> torch.Tensor:
        """Each slot's gradient norm over all its weights (as ``clip_grad_norm_`` computes one adapter's)."""
        total = torch.zeros(self.slots, device=self.device)
        for p in self.params:
            if p.grad is not None:
                total += p.grad.float().pow(2).flatten(1).sum(1)
        return total.sqrt()

    def clip(self, norms: torch.Tensor, max_norms: list[float]) -> None:
        """Scale each slot's gradient to at most its ``max_grad_norm`` (``inf``: unclipped)."""
        limit = torch.tensor(max_norms, device=self.device)
        coef = torch.clamp(limit / (norms + 1e-6), max=1.0)
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(coef.view(-1, *([1] * (p.dim() - 1))))

    @torch.no_grad()
    def step(self, active: list[int]) -> None:
        """One optimizer step for the ``active`` slots; the others' weights and state do not change."""
        for slot in active:
            self.steps[slot] += 1
        adam = [s for s in active if self._cfg(s).name == "adamw"]
        sgd = [s for s in active if self._cfg(s).name == "sgd"]
        for group, update in ((adam, self._adamw), (sgd, self._sgd)):
            if group:
                index = torch.tensor(group, device=self.device)
                for i, p in enumerate(self.params):
                    if p.grad is not None:
                        update(group, index, i, p)

    def _cfg(self, slot: int) -> OptimizerConfig:
        cfg = self.configs[slot]
        assert cfg is not None, f"slot {slot} has no trial"
        return cfg

    def _column(self, values: list[float], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, device=self.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def _adamw(self, group: list[int], index: torch.Tensor, i: int, p: torch.Tensor) -> None:
        cfgs = [self._cfg(s) for s in group]
        lrs = [c.lr * self.schedules[s](self.steps[s] - 1) for s, c in zip(group, cfgs, strict=True)]
        param, grad = p.data[index], p.grad[index]  # type: ignore[index]
        exp_avg, exp_avg_sq = self.exp_avg[i][index], self.exp_avg_sq[i][index]
        lr = self._column(lrs, param)
        beta1 = self._column([c.betas[0] for c in cfgs], param)
        beta2 = self._column([c.betas[1] for c in cfgs], param)
        param.mul_(1 - lr * self._column([c.weight_decay for c in cfgs], param))
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad * (1 - beta2))
        step_size = self._column([lr_ / (1 - c.betas[0] ** self.steps[s])
                                  for lr_, c, s in zip(lrs, cfgs, group, strict=True)], param)
        bias2_sqrt = self._column([math.sqrt(1 - c.betas[1] ** self.steps[s])
                                   for c, s in zip(cfgs, group, strict=True)], param)
        denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(self.EPS)
        param.sub_(exp_avg / denom * step_size)
        p.data[index] = param
        self.exp_avg[i][index] = exp_avg
        self.exp_avg_sq[i][index] = exp_avg_sq

    def _sgd(self, group: list[int], index: torch.Tensor, i: int, p: torch.Tensor) -> None:
        cfgs = [self._cfg(s) for s in group]
        lrs = [c.lr * self.schedules[s](self.steps[s] - 1) for s, c in zip(group, cfgs, strict=True)]
        param, grad = p.data[index], p.grad[index]  # type: ignore[index]
        d_p = grad + param * self._column([c.weight_decay for c in cfgs], param)
        momentum = self._column([c.momentum for c in cfgs], param)
        buf = self.exp_avg[i][index] * momentum + d_p  # the first step's buffer is d_p itself, as torch's
        nesterov = self._column([float(c.nesterov) for c in cfgs], param)
        has_momentum = self._column([float(c.momentum != 0) for c in cfgs], param)
        direction = torch.where(nesterov.bool(), d_p + momentum * buf, buf)
        direction = torch.where(has_momentum.bool(), direction, d_p)
        param.sub_(direction * self._column(lrs, param))
        p.data[index] = param
        self.exp_avg[i][index] = buf
