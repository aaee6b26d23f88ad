"""LoRA with several trials' adapters on one frozen base: every row of a pass goes through its own trial's adapter.

Each wrapped linear layer holds ``K`` slots of stacked adapter weights, ``A`` (K, r_max, in) and ``B``
(K, out, r_max). A trial of rank ``r < r_max`` uses the first ``r`` rows of its ``A`` and columns of its ``B``;
the rest are zero and get exactly zero gradient (each is multiplied by a zero of the other matrix), so a padded
slot trains as the unpadded adapter would. A slot without an adapter on a layer has zero weights and zero
scaling there: it contributes nothing and receives nothing. The scaling comes from the trial's true rank
(``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).

Dropout masks are a hash of (the trial's key for this step and pass, the layer, the element's row, token and
feature), computed on the device for all slots at once: a trial draws the same masks whichever trials share
its passes and however wide the pass is, and gradient checkpointing's recomputation redraws the same ones.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from objectives import slot_kernels
from objectives.base_cache import BUFFER, dense_grad, dense_product
from objectives.config import LoraConfig
from objectives.targets import resolve_targets
from objectives.transfer import Staging, send


@dataclass
class PassRows:
    """How the current pass is laid out: the same number of rows for every slot in it, slot after slot."""

    slots: torch.Tensor
    """The slots in the pass, in row order, on the device."""
    keys: list[tuple[int, int]] = field(default_factory=list)
    """(slot, dropout key) in row order; the key stands for the run's seed, step and pass."""
    rows: int = 1
    """Rows per slot."""
    key_tensor: torch.Tensor | None = None
    """The keys as int32 on the device, one per slot in the pass."""
    threshold: torch.Tensor | None = None
    """Each slot's dropout as the 24-bit hash value below which an element is dropped (int32, on the device)."""
    scale: torch.Tensor | None = None
    """Each slot's 1 / (1 - dropout) (fp32, on the device)."""
    dropping: bool = False
    """Whether any slot in the pass has dropout."""
    every_slot: bool = False
    """The pass holds every slot in order: the stacked weights serve as they are, without a gather."""
    reuse: bool = False
    """Whether layers keep their gathered weights from forward to backward (:meth:`weights`): in a step's first
    training pass only. A layer's copy is no larger than its gradient and goes before that gradient is made, so the
    copies fit in the gradients' share of the memory model; in a later pass of the step both would be held."""
    salted: torch.Tensor | None = None
    """Each layer's hash salts of the pass's slots (layers by index, slots in row order; int32, on the device):
    the keys salted for every layer in one operation, not by each layer in each call."""
    _picks: dict[tuple[int, int], slice | torch.Tensor | None] = field(default_factory=dict)
    _taken: dict[tuple[SlotLinear, int, int], tuple[torch.Tensor, ...]] = field(default_factory=dict)

    @property
    def order(self) -> list[int]:
        return [slot for slot, _ in self.keys]

    def pick(self, lo: int, hi: int) -> slice | torch.Tensor | None:
        """How to take the weights of the pass's slots ``lo`` to ``hi`` (in row order) from the stacked ones: all
        of them (``None``), a run of consecutive slots (a view) or a gather."""
        if (lo, hi) not in self._picks:
            order = self.order[lo:hi]
            if self.every_slot and (lo, hi) == (0, len(self.keys)):
                picked: slice | torch.Tensor | None = None
            elif order == list(range(order[0], order[0] + len(order))):
                picked = slice(order[0], order[0] + len(order))
            else:
                picked = self.slots[lo:hi]
            self._picks[lo, hi] = picked
        return self._picks[lo, hi]

    def weights(self, layer: SlotLinear, lo: int, hi: int, release: bool = False) -> tuple[torch.Tensor, ...]:
        """``A``, ``B`` and the scaling of ``layer``'s slots ``lo`` to ``hi`` (in row order). With ``reuse``, a
        gathered copy is kept from the layer's forward (and a checkpoint's recomputation) to its backward, which
        lets it go (``release``): gathered once, not three times."""
        key = (layer, lo, hi)
        taken = self._taken.pop(key, None) if release else self._taken.get(key)
        if taken is None:
            pick = self.pick(lo, hi)
            scaling: torch.Tensor = layer.scaling  # type: ignore[assignment]
            taken = tuple(_take(t, pick) for t in (layer.lora_A, layer.lora_B, scaling))
            if self.reuse and not release and isinstance(pick, torch.Tensor):
                self._taken[key] = taken
        return taken

    def release(self) -> None:
        """Let every kept copy go: the pass is over, whether or not each layer's backward ran (autograd's nodes
        keep the pass's layout until the next pass replaces them)."""
        self._taken.clear()

    @classmethod
    def of(cls, keys: list[tuple[int, int]], rows: int, device: torch.device, dropout: list[float] | None = None,
           slots: int | None = None) -> PassRows:
        """``dropout``: each slot's (by slot number); ``slots``: how many the layers hold."""
        order = [slot for slot, _ in keys]
        p = [dropout[slot] if dropout else 0.0 for slot in order]
        # One copy to the device per pass, not per layer: each small copy from the host waits for the device.
        ints = send(torch.tensor([order, [k & 0x7FFF_FFFF for _, k in keys], [round(q * 2**24) for q in p]],
                                 dtype=torch.int32), device)
        scale = send(torch.tensor([1 / (1 - q) for q in p], dtype=torch.float32), device)
        return cls(ints[0].long(), keys, rows, ints[1], ints[2], scale, any(p), order == list(range(slots or 0)))


# lowbias32 (a 32-bit integer hash with good avalanche), in int32 arithmetic: products wrap, and a logical
# right shift is an arithmetic one masked to the bits it keeps.
HASH_MUL = (0x7FEB352D, 0x846CA68B - 2**32)


def hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * HASH_MUL[0]
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * HASH_MUL[1]
    return x ^ ((x >> 16) & 0xFFFF)


class SlotContext:
    """State every slot layer of a model reads during a pass: the row layout and the slots' dropout."""

    def __init__(self, slots: int, max_length: int) -> None:
        self.rows: PassRows | None = None
        self.slots = slots
        self.dropout = [0.0] * slots
        self.max_length = max_length
        self._salts: dict[int, int] = {}
        self._salt_column: torch.Tensor | None = None
        self._index: dict[tuple[int, int, int], torch.Tensor] = {}

    def salt_of(self, index: int) -> int:
        """The dropout salt of the slot layer at ``index``, which :meth:`pass_rows` then salts keys for."""
        self._salts[index] = hash((index, 0x5EED)) & 0x7FFF_FFFF
        self._salt_column = None
        return self._salts[index]

    def pass_rows(self, keys: list[tuple[int, int]], rows: int, device: torch.device, training: bool = False,
                  reuse: bool = False) -> PassRows:
        """A pass's layout; ``training``: its layers drop; ``reuse``: see :attr:`PassRows.reuse`."""
        laid = PassRows.of(keys, rows, device, self.dropout, self.slots)
        laid.reuse = reuse
        if training and laid.dropping and self._salts:
            assert laid.key_tensor is not None
            laid.salted = laid.key_tensor.view(1, -1) ^ self._salt_column_on(laid.key_tensor.device)
        return laid

    def end_pass(self) -> None:
        """The pass is over: its layout goes, and with it what its layers kept."""
        if self.rows is not None:
            self.rows.release()
        self.rows = None

    def _salt_column_on(self, device: torch.device) -> torch.Tensor:
        """The layers' salts as an int32 column by index (0 in a gap): sent to the device once, not every pass."""
        if self._salt_column is None or self._salt_column.device != device:
            values = [self._salts.get(i, 0) for i in range(max(self._salts) + 1)]
            self._salt_column = send(torch.tensor(values, dtype=torch.int32).view(-1, 1), device)
        return self._salt_column

    def element_index(self, rows: int, tokens: int, features: int, device: torch.device) -> torch.Tensor:
        """(row * max_length + token) * features + feature, int32 (rows, tokens, features): an element's
        place in its slot's part of a pass, independent of the pass's width."""
        key = (rows, tokens, features)
        if key not in self._index:
            r = torch.arange(rows, device=device, dtype=torch.int32).view(-1, 1, 1)
            t = torch.arange(tokens, device=device, dtype=torch.int32).view(1, -1, 1)
            f = torch.arange(features, device=device, dtype=torch.int32).view(1, 1, -1)
            self._index[key] = (r * self.max_length + t) * features + f
        return self._index[key]


class SlotLinear(torch.nn.Module):
    """A frozen linear layer plus ``slots`` LoRA adapters, selected per row by :class:`SlotContext`."""

    def __init__(self, base_layer: torch.nn.Module, index: int, slots: int, r_max: int, ctx: SlotContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.index = index
        self.ctx = ctx
        self.in_features: int = base_layer.in_features  # type: ignore[assignment]
        self.out_features: int = base_layer.out_features  # type: ignore[assignment]
        self.salt = ctx.salt_of(index)
        device = next(base_layer.parameters()).device
        # fp32 adapter weights, as peft keeps them (``autocast_adapter_dtype``).
        self.lora_A = torch.nn.Parameter(torch.zeros(slots, r_max, self.in_features, device=device))
        self.lora_B = torch.nn.Parameter(torch.zeros(slots, self.out_features, r_max, device=device))
        self.register_buffer("scaling", torch.zeros(slots, device=device), persistent=False)
        self.used = [False] * slots

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = self.ctx.rows
        users = [] if rows is None else [i for i, slot in enumerate(rows.order) if self.used[slot]]
        if rows is None or not users:
            return self.base_layer(x, *args, **kwargs)
        weight = self.base_layer._buffers.get(BUFFER)
        if (weight is not None and not args and not kwargs and x.dtype == self.lora_A.dtype
                and self.base_layer.bias is None and not self.base_layer._forward_hooks
                and not self.base_layer._forward_pre_hooks):
            out: torch.Tensor = _SlotProduct.apply(x, weight, self.lora_A, self.lora_B, self, rows, users[0],
                                                   users[-1] + 1)
            return out
        return self._forward_every_slot(self.base_layer(x, *args, **kwargs), x, rows)

    def _forward_every_slot(self, result: torch.Tensor, x: torch.Tensor, rows: PassRows) -> torch.Tensor:
        """The adapters of every slot in the pass added to the base's output, by autograd's operations: for a base
        without the kept dense weight, or activations in another dtype than the adapters'."""
        # One batched product per pass: (slots, rows x tokens, in) against each slot's own weights, so no
        # weight is copied per row and the host's work does not grow with the number of slots.
        x = x.to(self.lora_A.dtype).reshape(len(rows.keys), -1, self.in_features)
        pick = rows.pick(0, len(rows.keys))
        scaling: torch.Tensor = self.scaling  # type: ignore[assignment]
        a, b, scaling = _take(self.lora_A, pick), _take(self.lora_B, pick), _take(scaling, pick)
        dropping = self.training and rows.dropping
        if dropping and slot_kernels.product_serves(x, a):
            hidden = slot_kernels.dropped_product(x, a, *self.dropout_of(rows, 0, len(rows.keys)),
                                                  x.shape[1] // rows.rows, self.ctx.max_length)
        else:
            if dropping:
                x = self.dropout(x, rows.rows, *self.dropout_of(rows, 0, len(rows.keys)))
            hidden = torch.bmm(x, a.transpose(1, 2))
        hidden = hidden * scaling.view(-1, 1, 1)
        if result.dtype == hidden.dtype:
            # The sum in the second product's epilogue: the scaling on the narrow hidden product, and no update
            # tensor of the output's size written, scaled and added (three passes over the widest activations).
            return torch.baddbmm(result.reshape(hidden.shape[0], -1, self.out_features), hidden, b.transpose(1, 2)
                                 ).view(result.shape)
        return (result + torch.bmm(hidden, b.transpose(1, 2)).view(result.shape)).to(result.dtype)

    def dropout_of(self, rows: PassRows, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The dropout's hash salt, threshold and scale of the pass's slots ``lo`` to ``hi`` at this layer; the salt
        from the pass's table, or (a pass laid out without :meth:`SlotContext.pass_rows`) salted here."""
        assert rows.key_tensor is not None and rows.threshold is not None and rows.scale is not None
        salted = rows.key_tensor[lo:hi] ^ self.salt if rows.salted is None else rows.salted[self.index, lo:hi]
        return salted, rows.threshold[lo:hi], rows.scale[lo:hi]

    def dropout(self, x: torch.Tensor, rows: int, salted: torch.Tensor, threshold: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
        """Each slot's dropout of ``x`` (slots, ``rows`` x tokens, features), drawn for all slots at once (see the
        module docstring). A slot without an adapter here gets its trial's dropout too: its zero weights make the
        result the same either way. Applied to a gradient, it is the dropout's backward (the same mask and
        scale)."""
        tokens = x.shape[1] // rows
        index = self.ctx.element_index(rows, tokens, x.shape[-1], x.device)
        bits = hash32(index.unsqueeze(0) ^ salted.view(-1, 1, 1, 1)) & 0xFF_FFFF
        keep = bits >= threshold.view(-1, 1, 1, 1)
        return (x.view(x.shape[0], rows, -1, x.shape[-1]) * keep * scale.view(-1, 1, 1, 1)).view(x.shape)


def _take(t: torch.Tensor, pick: slice | torch.Tensor | None) -> torch.Tensor:
    return t if pick is None else t[pick]


def _spread(grad: torch.Tensor, pick: slice | torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`_take`: ``grad`` in the picked slots of a zero gradient shaped as ``like``."""
    if pick is None:
        return grad
    full = torch.zeros_like(like)
    if isinstance(pick, slice):
        full[pick] = grad
    else:  # a slot twice in a pass (an evaluation's copies of several held-out passes) gets the sum of both
        full.index_add_(0, pick, grad)
    return full


class _SlotProduct(torch.autograd.Function):
    """A :class:`SlotLinear` call with the base's kept dense weight, as one autograd node: the base's product over
    the whole pass, and the adapters only on the pass's slots ``lo`` to ``hi`` (in row order), the first and last
    slot that adapt the layer.

    The engine orders a pass's slots by the layers they adapt (most first), so a layer that few trials adapt
    (the default space adapts the MLP in one trial of four) runs its adapters on those trials' rows alone. Slots
    in the range that do not adapt the layer have zero weights and scaling there, and add nothing. The adapters'
    output is added into the base's in place (the second product's epilogue), and in backward the input's
    gradient from the adapters into the base's (in the Triton kernel's epilogue on CUDA): no zero-filled
    gradient of the whole pass, and no separate sum."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                layer: SlotLinear, rows: PassRows, lo: int, hi: int) -> torch.Tensor:
        n = len(rows.keys)
        a, b, scaling = rows.weights(layer, lo, hi)
        result = dense_product(x, weight)
        xs = x.reshape(n, -1, layer.in_features)[lo:hi]
        dropping = layer.training and rows.dropping
        fused = dropping and slot_kernels.product_serves(xs, a)
        tokens = xs.shape[1] // rows.rows
        if fused:
            hidden = slot_kernels.dropped_forward(xs, a, *layer.dropout_of(rows, lo, hi), tokens, layer.ctx.max_length)
            kept = xs
        else:
            kept = layer.dropout(xs, rows.rows, *layer.dropout_of(rows, lo, hi)) if dropping else xs
            hidden = torch.bmm(kept, a.transpose(1, 2))
        hidden.mul_(scaling.view(-1, 1, 1))
        result.view(n, -1, layer.out_features)[lo:hi].baddbmm_(hidden, b.transpose(1, 2))
        ctx.save_for_backward(kept, hidden, lora_a, lora_b)
        ctx.weight, ctx.layer, ctx.rows, ctx.range = weight, layer, rows, (lo, hi)
        ctx.dropping, ctx.fused = dropping, fused
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        kept, hidden, lora_a, lora_b = ctx.saved_tensors
        layer, rows, (lo, hi), weight = ctx.layer, ctx.rows, ctx.range, ctx.weight
        n, pick = len(rows.keys), rows.pick(lo, hi)
        a, b, scaling = rows.weights(layer, lo, hi, release=True)
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        grad_x = dense_grad(grad, weight) if need_x else None
        g = grad.reshape(n, -1, layer.out_features)[lo:hi]
        # The products autograd runs for baddbmm and bmm, in their order of operands
        grad_b = torch.bmm(hidden.transpose(1, 2), g).transpose(1, 2) if need_b else None
        grad_hidden = torch.bmm(g, b).mul_(scaling.view(-1, 1, 1))
        into = None if grad_x is None else grad_x.view(n, -1, layer.in_features)[lo:hi]
        if ctx.fused:
            salted, threshold, scale = layer.dropout_of(rows, lo, hi)
            _, grad_a = slot_kernels.dropped_backward(
                grad_hidden, kept, a, salted, threshold, scale, kept.shape[1] // rows.rows, layer.ctx.max_length,
                need_x=into is not None, need_a=need_a, into=into)
        else:
            grad_a = torch.bmm(kept.transpose(1, 2), grad_hidden).transpose(1, 2) if need_a else None
            if into is not None:
                dx = torch.bmm(grad_hidden, a)
                if ctx.dropping:
                    dx = layer.dropout(dx, rows.rows, *layer.dropout_of(rows, lo, hi))
                into += dx
        return (grad_x, None, None if grad_a is None else _spread(grad_a, pick, lora_a),
                None if grad_b is None else _spread(grad_b, pick, lora_b), None, None, None, None)


def is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def inject_slots(model: torch.nn.Module, names: list[str], slots: int, r_max: int, device: torch.device,
                 max_length: int) -> tuple[SlotContext, dict[str, SlotLinear]]:
    """Wrap the named linear layers of ``model`` in place; returns the shared context and the wrappers by name."""
    ctx = SlotContext(slots, max_length)
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


@dataclass(frozen=True)
class SlotDraws:
    """A run's first adapter weights on the host, drawn before it takes a slot: in the caller's thread, so the
    engine's thread only copies them (drawing there took an eighth of a 64-slot engine's time on an H200)."""

    modules: list[str]
    """The wrapped layers the run adapts, in the engine's order."""
    flat: torch.Tensor
    """Every layer's scaling (zero where the run has no adapter), then ``A`` of each adapted layer, flattened."""

    @classmethod
    @torch.no_grad()
    def draw(cls, in_features: dict[str, int], lora: LoraConfig, seed: int) -> SlotDraws:
        """``A`` as peft draws it: Kaiming-uniform, in module order, from ``seed`` on the CPU; ``in_features`` maps
        each wrapped layer's name to its input width."""
        suffixes = resolve_targets(lora.targets, list(in_features))
        modules = [n for n in in_features if any(n == s or n.endswith("." + s) for s in suffixes)]
        chosen = set(modules)
        generator = torch.Generator().manual_seed(seed)
        scaling = lora_scaling(lora)
        parts = [torch.tensor([scaling if name in chosen else 0.0 for name in in_features])]
        for name in modules:
            a = torch.empty(lora.r, in_features[name])
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            parts.append(a.flatten())
        return cls(modules, torch.cat(parts))


@torch.no_grad()
def initialise_slot(wrapped: dict[str, SlotLinear], slot: int, lora: LoraConfig, draws: SlotDraws,
                    staging: Staging) -> None:
    """Fresh weights for one slot: ``A`` from ``draws`` (sent through ``staging``), ``B`` zero; zero everywhere the
    run has no adapter.

    A trial starts every few steps in a busy engine, so this is a handful of launches whatever the layer count:
    the draws go to the device in one copy, and zeros, draws and scalings each in one multi-tensor operation
    (a copy and two fills per layer made admissions a third of a 64-slot engine's host time on an H200).
    """
    chosen = set(draws.modules)
    layers = list(wrapped.values())
    for name, layer in wrapped.items():
        layer.used[slot] = name in chosen
    torch._foreach_zero_([t for layer in layers for t in (layer.lora_A[slot], layer.lora_B[slot])])
    targets = [layer for layer in layers if layer.used[slot]]
    device = layers[0].lora_A.device if layers else draws.flat.device
    sent = staging.send(draws.flat, device)
    torch._foreach_copy_([layer.scaling[slot:slot + 1] for layer in layers],  # type: ignore[index]
                         list(sent[:len(layers)].split(1)))
    if targets:
        pieces = sent[len(layers):].split([lora.r * layer.in_features for layer in targets])
        torch._foreach_copy_([layer.lora_A[slot, : lora.r] for layer in targets],
                             [piece.view(lora.r, layer.in_features) for piece, layer in zip(pieces, targets,
                                                                                             strict=True)])


def slot_parameter_count(wrapped: dict[str, SlotLinear], slot: int, r: int) -> int:
    return sum(r * (layer.in_features + layer.out_features) for layer in wrapped.values() if layer.used[slot])


class SlotAdapter:
    """One slot's adapter as a peft folder: ``PeftModel.from_pretrained(base, folder)`` loads it.

    ``base_model`` is ``model.source`` as configured (hub id, local path or ``package:`` spec), not the directory
    the weights were loaded from: a converted or random-init copy lives in one machine's cache.
    """

    def __init__(self, wrapped: dict[str, SlotLinear], slot: int, lora: LoraConfig, targets: list[str],
                 base_model: str | None) -> None:
        self.wrapped = wrapped
        self.slot = slot
        self.lora = lora
        self.targets = targets
        self.base_model = base_model
        self._state: dict[str, torch.Tensor] | None = None
        self._buffer: torch.Tensor | None = None
        """What a frozen copy's weights are views of."""

    def frozen(self) -> SlotAdapter:
        """A copy of this slot's weights (on their device) that outlives the slot's reuse by the next run."""
        copy = SlotAdapter(self.wrapped, self.slot, self.lora, self.targets, self.base_model)
        views = self.state_dict(to_cpu=False)
        if not views:
            copy._state = {}
            return copy
        # Into one buffer with one multi-tensor copy: a copy per weight was a few hundred launches per finished run.
        first = next(iter(views.values()))
        buffer = torch.empty(sum(v.numel() for v in views.values()), dtype=first.dtype, device=first.device)
        copies = [piece.view(v.shape) for piece, v in zip(buffer.split([v.numel() for v in views.values()]),
                                                          views.values(), strict=True)]
        torch._foreach_copy_(copies, list(views.values()))
        copy._state = dict(zip(views, copies, strict=True))
        copy._buffer = buffer
        return copy

    def state_dict(self, to_cpu: bool = True) -> dict[str, torch.Tensor]:
        if self._state is not None:
            if not to_cpu or self._buffer is None:
                return dict(self._state)
            # One copy from the device, not one per weight; then each its own tensor, as safetensors wants them.
            pieces = self._buffer.cpu().split([v.numel() for v in self._state.values()])
            return {k: piece.view(v.shape).clone() for (k, v), piece in zip(self._state.items(), pieces, strict=True)}
        r, slot, out = self.lora.r, self.slot, {}
        for name, layer in self.wrapped.items():
            if layer.used[slot]:
                a, b = layer.lora_A[slot, :r].detach(), layer.lora_B[slot, :, :r].detach()
                out[f"base_model.model.{name}.lora_A.weight"] = a.cpu().contiguous() if to_cpu else a
                out[f"base_model.model.{name}.lora_B.weight"] = b.cpu().contiguous() if to_cpu else b
        return out

    def save_pretrained(self, folder: str | Path, save_embedding_layers: bool = False) -> None:
        """Write the folder; ``save_embedding_layers`` is peft's argument, accepted for the same call: a slot
        adapter never has embeddings to save."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.lora.r,
                  "lora_alpha": self.lora.effective_alpha, "lora_dropout": self.lora.dropout,
                  "target_modules": sorted(self.targets), "use_rslora": self.lora.use_rslora, "bias": "none",
                  "base_model_name_or_path": self.base_model, "inference_mode": True}
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
