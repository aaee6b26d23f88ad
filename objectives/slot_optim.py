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

from objectives import slot_kernels
from objectives.config import OptimizerConfig
from objectives.training import lr_lambda
from objectives.transfer import send

# Each coefficient's neutral value: a slot whose optimizer does not use it keeps its weights and state. A slot that
# does not step ("stepped" 0) is left out: its gradient may be NaN or infinite, which no neutral value cancels.
# The order is the fused kernel's (objectives.slot_kernels).
COEFFICIENTS = {"decay": 1.0, "beta1": 1.0, "one_minus_beta1": 0.0, "beta2": 1.0, "one_minus_beta2": 0.0,
                "bias2_sqrt": 1.0, "adam_step": 0.0, "sgd_decay": 0.0, "momentum": 1.0, "into_buffer": 0.0,
                "from_grad": 0.0, "from_buffer": 0.0, "sgd_lr": 0.0, "stepped": 0.0}


class SlotOptimizer:
    """AdamW or SGD (momentum, Nesterov, weight decay) per slot, over ``params`` shaped (slots, ...)."""

    EPS = 1e-8

    def __init__(self, params: list[torch.nn.Parameter], slots: int) -> None:
        # The kernels read every weight and moment by address as contiguous fp32 (slot_kernels.address_table).
        assert all(p.dtype == torch.float32 and p.is_contiguous() and p.shape[0] == slots for p in params)
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
        self.clip_scale: torch.Tensor | None = None
        """Each slot's gradient scale from :meth:`clip`, applied by the next :meth:`step`."""

    def reset(self, slot: int, cfg: OptimizerConfig, total_steps: int) -> None:
        """A new trial in ``slot``: fresh state, its own schedule over ``total_steps``."""
        torch._foreach_zero_([buf[slot] for buf in (*self.exp_avg, *self.exp_avg_sq)])  # one launch, not 2 per weight
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
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros(self.slots, device=self.device)
        if slot_kernels.usable(grads[0]):
            with_grad = [i for i, w in enumerate(self.params) if w.grad is not None]
            return slot_kernels.square_sums(self._address_table(with_grad), self.slots).sum(0).sqrt()
        squares = torch._foreach_mul(grads, grads)
        return torch.stack([s.flatten(1).sum(1) for s in squares]).sum(0).sqrt()

    def clip(self, norms: torch.Tensor, max_norms: list[float]) -> None:
        """Scale each slot's gradient to at most its ``max_grad_norm`` (``inf``: unclipped) in the next step."""
        limit = send(torch.tensor(max_norms), self.device)
        self.clip_scale = torch.clamp(limit / (norms + 1e-6), max=1.0)

    @torch.no_grad()
    def step(self, active: list[int]) -> None:
        """One optimizer step for the ``active`` slots; the others' weights and state do not change.

        Every operation runs over all slots and all tensors at once (``torch._foreach_*``), with per-slot
        coefficients that leave a slot untouched where its optimizer does not apply (multiply by 1, add 0); a slot
        that does not step enters with a zero gradient (the kernel skips it), so a NaN there changes nothing.
        AdamW's moments and SGD's momentum buffer share ``exp_avg``: a slot uses one optimizer. Where the fused
        kernel runs (:mod:`objectives.slot_kernels`), it does the same arithmetic in one launch over every tensor.
        """
        # A layer no running slot adapts got no gradient: as torch's optimizers, leave it out, and count no step
        # where no weight has one.
        with_grad = [i for i, p in enumerate(self.params) if p.grad is not None]
        clip, self.clip_scale = self.clip_scale, None
        if not with_grad or not active:
            return
        for slot in active:
            self.steps[slot] += 1
        table = self._coefficients(active)
        if slot_kernels.usable(self.params[0]):
            ones = torch.ones(self.slots, device=self.device)
            slot_kernels.optimizer_step(self._address_table(with_grad), table, ones if clip is None else clip,
                                        self.EPS)
            return
        params = [self.params[i].data for i in with_grad]
        exp_avg = [self.exp_avg[i] for i in with_grad]
        exp_avg_sq = [self.exp_avg_sq[i] for i in with_grad]
        c = dict(zip(COEFFICIENTS, table, strict=True))

        def col(name: str) -> list[torch.Tensor]:
            return [along_slots(c[name], p) for p in params]

        # A slot that does not step gets a zero gradient, which its neutral coefficients leave without effect.
        grads = []
        for p, i in zip(params, with_grad, strict=True):
            g = self.params[i].grad
            assert g is not None
            grads.append(torch.where(along_slots(c["stepped"], p) != 0,
                                     g if clip is None else g * along_slots(clip, p), 0.0))

        # AdamW: decoupled decay, moments, bias-corrected step (multiplied before the division, so a slot whose
        # step is 0 adds an exact 0 whatever its buffer holds).
        torch._foreach_mul_(params, col("decay"))
        torch._foreach_mul_(exp_avg, col("beta1"))
        torch._foreach_add_(exp_avg, torch._foreach_mul(grads, col("one_minus_beta1")))
        torch._foreach_mul_(exp_avg_sq, col("beta2"))
        squared = torch._foreach_mul(grads, grads)
        torch._foreach_add_(exp_avg_sq, torch._foreach_mul(squared, col("one_minus_beta2")))
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, col("bias2_sqrt"))
        torch._foreach_add_(denom, self.EPS)
        torch._foreach_sub_(params, torch._foreach_div(torch._foreach_mul(exp_avg, col("adam_step")), denom))
        # SGD: L2 decay into the gradient, momentum (the first step's buffer is the gradient itself, as torch's).
        d_p = torch._foreach_add(grads, torch._foreach_mul(params, col("sgd_decay")))
        torch._foreach_mul_(exp_avg, col("momentum"))
        torch._foreach_add_(exp_avg, torch._foreach_mul(d_p, col("into_buffer")))
        direction = torch._foreach_add(torch._foreach_mul(d_p, col("from_grad")),
                                       torch._foreach_mul(exp_avg, col("from_buffer")))
        torch._foreach_sub_(params, torch._foreach_mul(direction, col("sgd_lr")))

    def _address_table(self, with_grad: list[int]) -> torch.Tensor:
        """The weights at ``with_grad`` with their gradients (made contiguous) and moments, for the kernels."""
        for i in with_grad:
            grad = self.params[i].grad
            assert grad is not None and grad.dtype == torch.float32
            if not grad.is_contiguous():
                self.params[i].grad = grad.contiguous()
        return slot_kernels.address_table([self.params[i].data for i in with_grad],
                                          [self.params[i].grad for i in with_grad],  # type: ignore[misc]
                                          [self.exp_avg[i] for i in with_grad], [self.exp_avg_sq[i] for i in with_grad])

    def _coefficients(self, active: list[int]) -> torch.Tensor:
        """(coefficients, slots) on the device, in :data:`COEFFICIENTS`' order; neutral (1 or 0) where a slot does
        not step."""
        table = {name: [v] * self.slots for name, v in COEFFICIENTS.items()}
        for slot in active:
            cfg = self._cfg(slot)
            t = self.steps[slot]
            lr = cfg.lr * self.schedules[slot](t - 1)
            if cfg.name == "adamw":
                b1, b2 = cfg.betas
                for name, v in (("decay", 1 - lr * cfg.weight_decay), ("beta1", b1), ("one_minus_beta1", 1 - b1),
                                ("beta2", b2), ("one_minus_beta2", 1 - b2),
                                ("bias2_sqrt", math.sqrt(1 - b2 ** t)), ("adam_step", lr / (1 - b1 ** t))):
                    table[name][slot] = v
            else:
                m = cfg.momentum
                # direction = from_grad * d_p + from_buffer * buffer: nesterov d_p + m * buf, plain buf, none d_p
                from_grad, from_buffer = (1.0, m) if cfg.nesterov else (0.0, 1.0) if m != 0 else (1.0, 0.0)
                for name, v in (("sgd_decay", cfg.weight_decay), ("momentum", m if m != 0 else 1.0),
                                ("into_buffer", 1.0 if m != 0 else 0.0), ("from_grad", from_grad),
                                ("from_buffer", from_buffer), ("sgd_lr", lr)):
                    table[name][slot] = v
            table["stepped"][slot] = 1.0
        return send(torch.tensor(list(table.values()), dtype=self.params[0].dtype), self.device)

    def _cfg(self, slot: int) -> OptimizerConfig:
        cfg = self.configs[slot]
        assert cfg is not None, f"slot {slot} has no trial"
        return cfg


def along_slots(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-slot ``values`` (slots,) shaped to broadcast over ``like`` (slots, ...)."""
    return values.view((-1,) + (1,) * (like.dim() - 1))
