"""LoRA with several trials' adapters on one frozen base: every row of a pass goes through its own trial's adapter.

Each wrapped linear layer holds ``K`` slots of stacked adapter weights, ``A`` (K, r_max, in) and ``B``
(K, out, r_max). A trial of rank ``r < r_max`` uses the first ``r`` rows of its ``A`` and columns of its ``B``;
the rest are zero and get exactly zero gradient (each is multiplied by a zero of the other matrix), so a padded
slot trains as the unpadded adapter would. A slot without an adapter on a layer has zero weights and zero
scaling there: it contributes nothing and receives nothing. The scaling comes from the trial's true rank
(``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).

Dropout masks come from each trial's own generator, re-seeded for every (step, pass, layer), so a trial draws
the same masks whichever trials share its passes, and gradient checkpointing's recomputation redraws the
same ones.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from objectives.config import LoraConfig


@dataclass
class PassRows:
    """How the current pass is laid out: the same number of rows for every slot in it, slot after slot."""

    slots: torch.Tensor
    """The slots in the pass, in row order, on the device."""
    keys: list[tuple[int, int]] = field(default_factory=list)
    """(slot, dropout key) in row order; the key (the run's seed, step and pass) seeds that slot's dropout
    masks in this pass together with the layer's index."""

    @classmethod
    def of(cls, keys: list[tuple[int, int]], device: torch.device) -> PassRows:
        return cls(torch.tensor([slot for slot, _ in keys], device=device), keys)


class SlotContext:
    """State every slot layer of a model reads during a pass: the row layout and the slots' dropout."""

    def __init__(self, slots: int, device: torch.device) -> None:
        self.rows: PassRows | None = None
        self.dropout = [0.0] * slots
        self.generator = torch.Generator(device=device)


class SlotLinear(torch.nn.Module):
    """A frozen linear layer plus ``slots`` LoRA adapters, selected per row by :class:`SlotContext`."""

    def __init__(self, base_layer: torch.nn.Module, index: int, slots: int, r_max: int, ctx: SlotContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.index = index
        self.ctx = ctx
        self.in_features: int = base_layer.in_features  # type: ignore[assignment]
        self.out_features: int = base_layer.out_features  # type: ignore[assignment]
        device = next(base_layer.parameters()).device
        # fp32 adapter weights, as peft keeps them (``autocast_adapter_dtype``).
        self.lora_A = torch.nn.Parameter(torch.zeros(slots, r_max, self.in_features, device=device))
        self.lora_B = torch.nn.Parameter(torch.zeros(slots, self.out_features, r_max, device=device))
        self.register_buffer("scaling", torch.zeros(slots, device=device), persistent=False)
        self.used = [False] * slots

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        rows = self.ctx.rows
        if rows is None or not any(self.used[slot] for slot, _ in rows.keys):
            return result
        # One batched product per pass: (slots, rows x tokens, in) against each slot's own weights, so no
        # weight is copied per row and the host's work does not grow with the number of slots.
        x = x.to(self.lora_A.dtype).reshape(len(rows.keys), -1, self.in_features)
        if self.training:
            x = self._dropout(x, rows)
        scaling: torch.Tensor = self.scaling  # type: ignore[assignment]
        hidden = torch.bmm(x, self.lora_A[rows.slots].transpose(1, 2))
        update = torch.bmm(hidden, self.lora_B[rows.slots].transpose(1, 2)) * scaling[rows.slots].view(-1, 1, 1)
        return (result + update.view(result.shape)).to(result.dtype)

    def _dropout(self, x: torch.Tensor, rows: PassRows) -> torch.Tensor:
        parts = []
        for i, (slot, key) in enumerate(rows.keys):
            p = self.ctx.dropout[slot]
            part = x[i]
            if p > 0 and self.used[slot]:
                gen = self.ctx.generator
                gen.manual_seed(hash((key, self.index)) & 0x7FFF_FFFF_FFFF_FFFF)
                keep = torch.rand(part.shape, generator=gen, device=part.device, dtype=part.dtype) >= p
                part = part * keep / (1 - p)
            parts.append(part)
        return torch.stack(parts)


def is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def inject_slots(model: torch.nn.Module, names: list[str], slots: int, r_max: int,
                 device: torch.device) -> tuple[SlotContext, dict[str, SlotLinear]]:
    """Wrap the named linear layers of ``model`` in place; returns the shared context and the wrappers by name."""
    ctx = SlotContext(slots, device)
    wrapped: dict[str, SlotLinear] = {}
    for index, name in enumerate(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = SlotLinear(getattr(parent, child), index, slots, r_max, ctx)
        setattr(parent, child, layer)
        wrapped[name] = layer
    return ctx, wrapped


def remove_slots(model: torch.nn.Module, wrapped: dict[str, SlotLinear]) -> None:
    """Put the bare linear layers back."""
    for name, layer in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)


def lora_scaling(lora: LoraConfig) -> float:
    return lora.effective_alpha / (math.sqrt(lora.r) if lora.use_rslora else lora.r)


@torch.no_grad()
def initialise_slot(wrapped: dict[str, SlotLinear], slot: int, modules: list[str], lora: LoraConfig,
                    seed: int) -> None:
    """Fresh weights for one slot: ``A`` as peft draws it (Kaiming-uniform, in module order, from ``seed`` on
    the CPU), ``B`` zero; zero everywhere the trial has no adapter."""
    generator = torch.Generator().manual_seed(seed)
    chosen = set(modules)
    scaling = lora_scaling(lora)
    for name, layer in wrapped.items():
        layer.lora_A[slot].zero_()
        layer.lora_B[slot].zero_()
        layer.used[slot] = name in chosen
        layer.scaling[slot] = scaling if name in chosen else 0.0  # type: ignore[index,operator]
        if name in chosen:
            a = torch.empty(lora.r, layer.in_features)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            layer.lora_A[slot, : lora.r].copy_(a)


def slot_parameter_count(wrapped: dict[str, SlotLinear], slot: int, r: int) -> int:
    return sum(r * (layer.in_features + layer.out_features) for layer in wrapped.values() if layer.used[slot])


class SlotAdapter:
    """One slot's adapter as a peft folder: ``PeftModel.from_pretrained(base, folder)`` loads it."""

    def __init__(self, wrapped: dict[str, SlotLinear], slot: int, lora: LoraConfig, targets: list[str],
                 base_model: str | None) -> None:
        self.wrapped = wrapped
        self.slot = slot
        self.lora = lora
        self.targets = targets
        self.base_model = base_model

    def state_dict(self) -> dict[str, torch.Tensor]:
        r, slot, out = self.lora.r, self.slot, {}
        for name, layer in self.wrapped.items():
            if layer.used[slot]:
                out[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A[slot, :r].detach().cpu().contiguous()
                out[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B[slot, :, :r].detach().cpu().contiguous()
        return out

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.lora.r,
                  "lora_alpha": self.lora.effective_alpha, "lora_dropout": self.lora.dropout,
                  "target_modules": sorted(self.targets), "use_rslora": self.lora.use_rslora, "bias": "none",
                  "base_model_name_or_path": self.base_model, "inference_mode": True}
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
