"""Many runs at once on one resident base: every forward and backward pass carries rows of several runs.

A :class:`SlotEngine` owns the base's linear layers wrapped with ``slots`` adapters (:mod:`objectives.slots`)
and trains whatever runs are admitted, one step of each per pass, in a thread of its own. A run is submitted
with its config and hooks (as :func:`objectives.objective.run_recipe` takes them) and gets a future; a run
that finishes, fails or is stopped by a hook frees its slot, and the next submitted run takes it at the next
step: no barrier.

Each run trains as it would alone: its loss is normalised over its own tokens, its gradient is clipped by its
own norm, its optimizer, schedule, data order and dropout masks are its own (:mod:`objectives.slot_optim`).
A NaN or infinite loss stops that run only. Runs due for evaluation are evaluated together.

Settings that cannot differ within a pass are the engine's: the base (model.*, with gradient checkpointing and
the base cache as the base has them), data.*, train.packing and train.fused_loss; passes change their mix of runs
from step to step, so none is replayed from a CUDA graph (train.cuda_graphs is off). A run's recorded config says
what the engine trained it with.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from objectives.attention import on_device, routed
from objectives.base import ResidentBase, current_device, free_accelerator_memory
from objectives.config import ConfigError, RecipeConfig
from objectives.data import Rows, TokenizedSplits, targets_in, train_micro_batches
from objectives.decisions import with_base_cache, with_checkpointing, with_cuda_graphs, with_fused_loss
from objectives.host_turns import TURNS
from objectives.loss import check_fused_loss, group_loss_sums, hidden_and_head, plain_head, target_loss_sums
from objectives.objective import RunHooks, RunResult, TrialOutOfMemory, halve_micro_batch, is_out_of_memory
from objectives.passes import merge_passes, merged_chunks, predicted_tokens, row_losses
from objectives.slot_optim import SlotOptimizer
from objectives.slots import (
    SlotAdapter,
    SlotDraws,
    initialise_slot,
    inject_slots,
    remove_slots,
    slot_parameter_count,
)
from objectives.training import LossNotFinite, TrainResult, eval_passes, forward_passes, peak_memory_mb
from objectives.transfer import Staging, send

log = logging.getLogger(__name__)


@dataclass
class Job:
    """A submitted run and where its result goes."""

    cfg: RecipeConfig
    hooks: RunHooks
    future: Future[RunResult] = field(default_factory=Future)
    started: bool = False
    attempts: int = 0
    events: Any = None
    """With :meth:`SlotEngine.run`, the hooks run in the caller's thread: the engine posts them here (a queue's
    ``put``; None at the run's end, after its future is set)."""
    stop: BaseException | None = None
    """Set by the caller's thread when a hook raised: the engine ends the run at its next step."""
    draws: SlotDraws | BaseException | None = None
    """The run's first adapter weights, drawn in the caller's thread, or why they could not be."""


@dataclass
class Running:
    """A run in a slot: its progress and its data stream."""

    job: Job
    slot: int
    batches: Iterator[Rows]
    params: int
    adapts: tuple[str, ...] = ()
    """The wrapped layers the run adapts."""
    step: int = 0
    busy: float = 0.0
    eval_loss: float = math.nan
    since: float = field(default_factory=time.perf_counter)
    steps: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    """Steps not yet sent to the caller's thread (:meth:`SlotEngine.run`): sent with its next other hook, or
    every :data:`STEPS_PER_MESSAGE`."""


STEPS_PER_MESSAGE = 8
"""A run's steps go to its caller's thread a few at a time: a message per step and run woke every trial's
thread at every step, each of them to wait for a turn at the interpreter."""


@dataclass(frozen=True)
class EngineShape:
    """What a caller needs of an engine to hand it a run: the settings its passes share and its layers' widths."""

    r_max: int
    in_features: dict[str, int]
    checkpointing: bool | str
    """On, off, or ``auto`` where the engine decides it per pass (a run records that)."""
    base_cache: bool
    fused_loss: bool

    def as_trained(self, cfg: RecipeConfig) -> RecipeConfig:
        """``cfg`` with the settings every run of a pass shares as the engine and its base have them."""
        shared = with_base_cache(with_checkpointing(cfg, self.checkpointing), self.base_cache)
        return with_cuda_graphs(with_fused_loss(shared, self.fused_loss), False)

    def draw(self, cfg: RecipeConfig) -> SlotDraws | BaseException:
        """A run's first weights, drawn in the caller's thread; a failure (a rank over the engine's widest, unknown
        targets) goes to the run's future when it is admitted, as every failure of a run does."""
        try:
            if cfg.lora.r > self.r_max:
                raise ConfigError(f"lora.r: {cfg.lora.r} exceeds the engine's widest rank {self.r_max}")
            return SlotDraws.draw(self.in_features, cfg.lora, cfg.train.seed)
        except Exception as e:
            return e


Event = tuple[str, tuple[Any, ...]]


def follow(events: queue.SimpleQueue[Event | None], hooks: RunHooks, stop: Any) -> BaseException | None:
    """Run the hooks an engine posts for one run, in this (the caller's) thread, until the run's end (None).

    The first exception a hook raises (a pruner's decision, a failed save) is handed to ``stop`` (which ends the
    run at its next step) and returned; the hooks of events after it are skipped."""
    stopped: BaseException | None = None
    while (event := events.get()) is not None:
        if stopped is not None:
            continue
        name, args = event
        try:
            with TURNS.bookkeeping():
                if name == "steps":
                    for step, metrics in args[0]:
                        hooks.on_step(step, metrics)
                else:
                    getattr(hooks, name)(*args)
        except BaseException as e:  # the engine ends the run; the caller raises it
            stopped = e
            stop(e)
    return stopped


class SlotEngine:
    """Up to ``slots`` runs trained together on ``base`` (its linear layers are wrapped until :meth:`close`).

    Example:
        >>> engine = SlotEngine(base, data, slots=8, r_max=64)  # doctest: +SKIP
        >>> futures = [engine.submit(cfg, RunHooks()) for cfg in configs]  # doctest: +SKIP
        >>> results = [f.result() for f in futures]  # doctest: +SKIP
        >>> engine.close()  # doctest: +SKIP
    """

    def __init__(self, base: ResidentBase, data: TokenizedSplits, slots: int, r_max: int,
                 eval_batch_size: int = 4, packing: bool = True, start: bool = True, fused_loss: Any = "auto",
                 host_turns: bool | None = None, per_pass: Callable[[int, int, bool], bool] | None = None) -> None:
        """``per_pass``: whether a pass of (rows, width, through the variable-length kernel) trains with gradient
        checkpointing (:class:`objectives.decisions.PassCheckpointing`); None keeps the base's setting for every
        pass.
        ``fused_loss``: ``train.fused_loss`` for every pass. ``auto`` is off: one fused call per slot's rows made
        a 64-slot pass 1.6x slower on an H200 (BENCHMARKS.md, benchmark 5), and the slot count is already sized
        to fit with full logits. ``host_turns``: whether the engine takes turns at the interpreter with its runs'
        hooks (:mod:`objectives.host_turns`); None: on CUDA, where the engine launches kernels and waits for them.

        Raises:
            ConfigError: ``fused_loss`` is on where it cannot run.
        """
        check_fused_loss(fused_loss, base.device.type, base.config)
        self.fused_loss = fused_loss is True
        self.head_at_targets = not self.fused_loss and plain_head(base.config)
        base.release_adapter()
        self.base = base
        self.data = data
        self.slots = slots
        self.capacity = slots
        self.r_max = r_max
        self.packing = packing
        self.per_pass = per_pass
        self.checkpointed = {False: 0, True: 0}
        """Training passes without and with checkpointing, as ``per_pass`` decided them."""
        self.pad_id = base.tokenizer.pad_token_id
        self.ctx, self.wrapped = inject_slots(base.model, list(base.linear_names), slots, r_max, base.device,
                                             data.max_length)
        self.shape = EngineShape(r_max, {name: layer.in_features for name, layer in self.wrapped.items()},
                                 base.checkpointing if per_pass is None else "auto", base.base_cache,
                                 self.fused_loss)
        params = [p for layer in self.wrapped.values() for p in (layer.lora_A, layer.lora_B)]
        self.optimizer = SlotOptimizer(params, slots)
        self.staging = Staging()
        self.held_out = eval_passes(data, eval_batch_size, packing, self.pad_id, self._one_row_per_run())
        self.eval_targets = sum(targets_in(b) for b in self.held_out)
        self.pending: collections.deque[Job] = collections.deque()
        self.running: dict[int, Running] = {}
        self._tokens: dict[int, int] = {}
        self.lock = threading.Condition()
        self.closed = False
        self.turns = TURNS
        if host_turns if host_turns is not None else base.device.type == "cuda":
            self.turns.active = True
        self.thread = threading.Thread(target=self._loop, name="slot-engine", daemon=True)
        if start:
            self.thread.start()

    # --- the caller's side -------------------------------------------------------------------------

    def submit(self, cfg: RecipeConfig, hooks: RunHooks | None = None) -> Future[RunResult]:
        """Queue a run; its future holds the :class:`RunResult` or the exception that ended it."""
        cfg = self.shape.as_trained(cfg)
        job = Job(cfg, hooks or RunHooks(), draws=self.shape.draw(cfg))
        self.enqueue(job)
        return job.future

    def run(self, cfg: RecipeConfig, hooks: RunHooks | None = None) -> RunResult:
        """Run ``cfg`` in a slot and wait for it; its hooks run in this (the caller's) thread, so their logging
        and pruning decisions never stall the passes the other slots share. A hook that raises ends the run
        at its next step (a pruned trial may train one step more than it reports). Steps reach ``on_step`` up to
        :data:`STEPS_PER_MESSAGE` at a time, so a stop raised there ends the run up to that many steps later."""
        hooks = hooks or RunHooks()
        cfg = self.shape.as_trained(cfg)
        with self.turns.bookkeeping():
            hooks.on_start(cfg)
        events: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        job = Job(cfg, hooks, started=True, events=events, draws=self.shape.draw(cfg))
        self.enqueue(job)
        stopped = follow(events, hooks, lambda e: setattr(job, "stop", e))
        if stopped is not None:
            raise stopped
        return job.future.result()

    def enqueue(self, job: Job) -> None:
        """Queue a prepared job: the next free slot takes it."""
        with self.lock:
            if self.closed:
                raise RuntimeError("the engine is closed")
            self.pending.append(job)
            self.lock.notify_all()

    def close(self) -> None:
        """Stop after the current step; unfinished runs fail; the base gets its bare linear layers back."""
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        if self.thread.is_alive():
            self.thread.join()
        self.turns.stop()
        for run in self.running.values():  # the steps a stopped run trained are logged too
            self._send_steps(run)
        for job in [*self.pending, *(r.job for r in self.running.values())]:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the engine stopped before this run finished"))
                if job.events is not None:
                    job.events.put(None)
        self.pending.clear()
        self.running.clear()
        remove_slots(self.base.model, self.wrapped)

    # --- the engine's thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.closed and not self.pending and not self.running:
                    self.lock.wait(timeout=1.0)
                if self.closed:
                    return
            self.advance()

    def advance(self) -> None:
        """Admit what the free slots take, then one :meth:`tick`: the engine's thread's loop body, which an engine
        made with ``start=False`` runs in its caller's thread (a profiler sees that thread only)."""
        with self.lock:
            admitted: list[Job] = []
            while self.pending and len(self.running) + len(admitted) < self.capacity:
                admitted.append(self.pending.popleft())
        with self.turns.engine(), current_device(self.base.device):
            for job in admitted:
                self._admit(job)
            if self.running:
                self.tick()

    def _admit(self, job: Job) -> None:
        if job.future.done():
            return
        if job.stop is not None:
            self._finish(-1, error=job.stop, job=job)
            return
        slot = next(s for s in range(self.slots) if s not in self.running)
        cfg = job.cfg
        try:
            if not isinstance(job.draws, SlotDraws):
                raise job.draws or RuntimeError("a run reached the engine without its first weights")
            if not job.started:
                job.started = True
                job.hooks.on_start(cfg)
            initialise_slot(self.wrapped, slot, cfg.lora, job.draws, self.staging)
            self.ctx.dropout[slot] = cfg.lora.dropout
            self.optimizer.reset(slot, cfg.optimizer, cfg.train.max_steps)
            batches = train_micro_batches(self.data.train, cfg.train.micro_batch_size, cfg.train.seed)
            self.running[slot] = Running(job, slot, batches, slot_parameter_count(self.wrapped, slot, cfg.lora.r),
                                         tuple(job.draws.modules))
        except BaseException as e:  # the run's caller gets every failure through its future
            self._finish(slot, error=e, job=job)

    def tick(self) -> None:
        """One optimizer step of every running run; then evaluations that are due; then finished runs."""
        for slot, run in list(self.running.items()):
            if run.job.stop is not None:
                self._finish(slot, error=run.job.stop)
        if not self.running:
            return
        start = time.perf_counter()
        try:
            losses, norms = self._train_step()
        except Exception as e:
            self._fail_step(e)
            return
        elapsed = time.perf_counter() - start
        stepped = []
        for slot, run in list(self.running.items()):
            loss, norm = losses[slot], norms[slot]
            run.busy += elapsed
            if not math.isfinite(loss) or not math.isfinite(norm):
                what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm} (loss {loss:.4f})"
                self._finish(slot, error=LossNotFinite(f"{what} at step {run.step + 1}"))
                continue
            stepped.append(slot)
        lrs = {slot: self.optimizer.lr(slot) for slot in stepped}
        self.optimizer.step(stepped)
        for p in self.optimizer.params:
            p.grad = None
        peak = peak_memory_mb(self.base.device)
        for slot in stepped:
            run = self.running[slot]
            run.step += 1
            metrics = {"train_loss": losses[slot], "learning_rate": lrs[slot], "grad_norm": norms[slot],
                       "tokens_per_s": self._tokens.get(slot, 0) / elapsed, "peak_memory_mb": peak}
            if run.job.events is None:
                self._call(slot, "on_step", run.step, metrics)
                continue
            run.steps.append((run.step, metrics))
            if len(run.steps) >= STEPS_PER_MESSAGE:
                self._send_steps(run)
        due = [s for s, r in self.running.items()
               if r.step % r.job.cfg.train.eval_every == 0 or r.step == r.job.cfg.train.max_steps]
        if due:
            try:
                self._evaluate(due)
            except Exception as e:  # out of memory as in a training pass: fewer runs per pass, the runs start over
                self._fail_step(e)
                return
        for slot, run in list(self.running.items()):
            if run.step >= run.job.cfg.train.max_steps:
                self._complete(slot)

    def _train_step(self) -> tuple[dict[int, float], dict[int, float]]:
        """Forward and backward over every running run's step; (loss, gradient norm) per slot, read once."""
        device = self.base.device
        self.base.model.train()
        passes: dict[int, list[dict[str, torch.Tensor]]] = {}
        scale = torch.zeros(self.slots)
        self._tokens = {}
        one_row = self._one_row_per_run()
        for slot, run in self.running.items():
            train = run.job.cfg.train
            window = [next(run.batches) for _ in range(train.grad_accum)]
            passes[slot] = forward_passes(window, self.packing, self.pad_id, self.data.max_length, one_row)
            scale[slot] = 1.0 / max(1, sum(targets_in(b) for b in passes[slot]))
            self._tokens[slot] = sum(len(r["input_ids"]) for rows in window for r in rows)
        scale = send(scale, device)
        loss_sum = torch.zeros(self.slots, device=device)
        for j in range(max(len(p) for p in passes.values())):
            parts = [(slot, p[j], hash((self.running[slot].job.cfg.train.seed, self.running[slot].step, j)))
                     for slot, p in passes.items() if j < len(p)]
            batch, keys = merge_passes(self._by_adapted_layers(parts), self.pad_id)
            labels = batch.pop("labels")
            if self.per_pass is not None:
                self.base.use_checkpointing(self.per_pass(labels.shape[0], labels.shape[1], one_row))
                self.checkpointed[self.base.checkpointing] += 1
            self.ctx.rows = self.ctx.pass_rows(keys, labels.shape[0] // len(keys), device, training=True,
                                               reuse=(j == 0))
            try:
                per_slot = self._slot_loss_sums(on_device(self.base.model, batch, device), labels, keys) * scale
                per_slot.sum().backward()
            finally:
                self.ctx.end_pass()
            loss_sum += per_slot.detach()
        norms = self.optimizer.grad_norms()
        limits = [math.inf] * self.slots
        for slot, run in self.running.items():
            limit = run.job.cfg.train.max_grad_norm
            limits[slot] = limit if limit > 0 else math.inf
        with self.turns.waiting():
            values = torch.stack([loss_sum, norms]).tolist()
        self.optimizer.clip(norms, limits)
        return dict(enumerate(values[0])), dict(enumerate(values[1]))

    def _by_adapted_layers(self, parts: list[tuple[int, Any, int]]) -> list[tuple[int, Any, int]]:
        """A pass's parts, the slots that adapt the most layers first and slots that adapt the same layers together:
        the slots that adapt a layer are then a short range of the pass, and only that range runs the layer's
        adapters (:class:`objectives.slots.SlotLinear`). For targets that nest, as the default space's do (q and k,
        then v, o, the MLP), each layer's are the first slots of the pass."""
        def key(part: tuple[int, Any, int]) -> tuple[int, tuple[str, ...], int]:
            adapts = self.running[part[0]].adapts
            return -len(adapts), adapts, part[0]  # in slot order within a group: their weights are then a view
        return sorted(parts, key=key)

    def _one_row_per_run(self) -> bool:
        """Whether each run's packed pass, and each held-out pass, is one row, its examples end to end (otherwise
        rows of ``data.max_length``). A merged pass pads every run to the most rows and the widest row of any: on the
        default data 32 runs' packed rows were 53% real tokens, one row per run 74%. Only where the pass goes
        through the variable-length kernel, whose cost follows the examples: sdpa's block mask grows with the
        square of a row's width. A run's dropout masks follow its own layout, which no other run changes."""
        return self.packing and routed(self.base.model, self.base.device)

    @torch.no_grad()
    def _evaluate(self, due: list[int]) -> None:
        """Held-out loss of the due runs, several runs' copies of each held-out pass in one forward."""
        device = self.base.device
        self.base.model.eval()
        # Every due run's copy of every held-out pass, as few forwards as hold them: a forward costs the host the same
        # launches at any width. At most as many tokens per forward, padding included, as the slots' micro-batches
        # at data.max_length: the memory the slots were sized for. Pass by pass, so that a forward mostly merges
        # copies of one held-out pass, which need no padding to each other.
        budget = self.data.max_length * sum(r.job.cfg.train.micro_batch_size for r in self.running.values())
        parts = [(slot, batch, 0) for batch in self.held_out for slot in due]
        totals = torch.zeros(self.slots, device=device)
        try:
            shapes = [(batch["input_ids"].shape[0], batch["input_ids"].shape[1]) for _, batch, _ in parts]
            for first, end in merged_chunks(shapes, budget):
                merged, keys = merge_passes(self._by_adapted_layers(parts[first:end]), self.pad_id)
                labels = merged.pop("labels")
                self.ctx.rows = self.ctx.pass_rows(keys, labels.shape[0] // len(keys), device)
                totals += self._slot_loss_sums(on_device(self.base.model, merged, device), labels, keys)
        finally:
            self.ctx.end_pass()
            self.base.model.train()
        with self.turns.waiting():
            losses = (totals / max(1, self.eval_targets)).tolist()
        for slot in due:
            run = self.running[slot]
            run.eval_loss = losses[slot]
            if self._call(slot, "on_eval", run.step, run.eval_loss) and not math.isfinite(run.eval_loss):
                self._finish(slot, error=LossNotFinite(f"eval loss is {run.eval_loss} at step {run.step}"))

    def _slot_loss_sums(self, batch: dict[str, Any], labels: torch.Tensor, keys: list[tuple[int, int]]
                        ) -> torch.Tensor:
        """Each slot's summed loss over its rows of a merged pass (zero for slots not in it), from ``labels`` on the
        host: the head on the predicted tokens alone, full logits row by row where the head is not a plain linear
        layer, or fused with the head in one call per slot's rows (:mod:`objectives.loss`)."""
        device = self.base.device
        row_slots = torch.tensor([slot for slot, _ in keys]).repeat_interleave(labels.shape[0] // len(keys))
        if self.head_at_targets:
            predicted = send(predicted_tokens(labels, row_slots), device)  # positions found on the host: no sync
            return target_loss_sums(self.base.model, batch, predicted, self.slots)
        labels = send(labels, device)
        out = torch.zeros(self.slots, device=device)
        if self.fused_loss:
            hidden, weight = hidden_and_head(self.base.model, batch)
            slots = send(torch.tensor([slot for slot, _ in keys]), device)
            return out.index_add(0, slots, group_loss_sums(hidden, weight, labels, len(keys)))
        logits = self.base.model(**batch).logits
        return out.index_add(0, send(row_slots, device), row_losses(logits, labels))

    def _call(self, slot: int, name: str, *args: Any) -> bool:
        """A hook of the slot's run: posted to the caller's thread (:meth:`run`), or run here (:meth:`submit`),
        where an exception from it ends the run at once (a pruner stops a trial this way)."""
        job = self.running[slot].job
        if job.events is not None:
            self._send_steps(self.running[slot])
            job.events.put((name, args))
            return True
        try:
            getattr(job.hooks, name)(*args)
            return True
        except BaseException as e:  # handed to the run's caller through its future
            self._finish(slot, error=e)
            return False

    @staticmethod
    def _send_steps(run: Running) -> None:
        if run.steps and run.job.events is not None:
            run.job.events.put(("steps", (run.steps,)))
            run.steps = []

    def _complete(self, slot: int) -> None:
        run = self.running[slot]
        cfg = run.job.cfg
        result = TrainResult(eval_loss=run.eval_loss, steps=run.step, trainable_params=run.params,
                             peak_memory_mb=peak_memory_mb(self.base.device), seconds=run.busy)
        targets = sorted({n.rsplit(".", 1)[-1] for n, layer in self.wrapped.items() if layer.used[slot]})
        adapter = SlotAdapter(self.wrapped, slot, cfg.lora, targets, self.base.cfg.source)
        if run.job.events is not None:  # saved later, in the caller's thread, after the slot is reused
            adapter = adapter.frozen()
        if self._call(slot, "on_finish", result, adapter):
            self._finish(slot, result=RunResult(result, cfg, time.perf_counter() - run.since))

    def _finish(self, slot: int, result: RunResult | None = None, error: BaseException | None = None,
                job: Job | None = None) -> None:
        run = self.running.pop(slot, None)
        if run is not None:
            self._send_steps(run)
        job = job or (run.job if run is not None else None)
        if slot >= 0:  # -1: a job that never took a slot (its stop came while it waited)
            for layer in self.wrapped.values():
                layer.used[slot] = False
        if job is None or job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)  # type: ignore[arg-type]
        if job.events is not None:
            job.events.put(None)

    def _fail_step(self, error: Exception) -> None:
        """A step failed for every running run. Out of memory: checkpointing for every pass where ``per_pass``
        had turned it off, else half the slots, then (one slot left) half the micro-batch with twice the
        accumulation, up to each run's ``train.oom_retries``; the runs start over, those beyond the new capacity
        first in line. Anything else fails them all."""
        for p in self.optimizer.params:
            p.grad = None
        if not is_out_of_memory(error):
            for slot in list(self.running):
                self._finish(slot, error=error)
            return
        free_accelerator_memory(self.base.device)
        # A pass the memory model let go without checkpointing comes first: checkpoint every pass, same slots.
        checkpoint_all = self.per_pass is not None and not self.base.checkpointing
        halve_slots = not checkpoint_all and self.capacity > 1
        if checkpoint_all:
            self.per_pass = None
            self.base.use_checkpointing(True)
            log.warning("out of memory in a pass without checkpointing; every pass checkpoints from now on")
        elif halve_slots:
            self.capacity //= 2
            log.warning("out of memory with %d runs per pass; continuing with %d", len(self.running), self.capacity)
        halve_batch = not (checkpoint_all or halve_slots)
        restart = []
        for slot in sorted(self.running):
            job = self.running[slot].job
            smaller = halve_micro_batch(job.cfg.train) if halve_batch else None
            if halve_batch and (smaller is None or job.attempts >= job.cfg.train.oom_retries):
                self._finish(slot, error=TrialOutOfMemory(
                    f"out of memory at one run per pass, micro_batch_size={job.cfg.train.micro_batch_size}, "
                    f"grad_accum={job.cfg.train.grad_accum} after {job.attempts} retries"))
                continue
            self._send_steps(self.running.pop(slot))
            job.attempts += 1
            changes: dict[str, Any] = {"slots": self.capacity}
            if checkpoint_all:
                changes = {"gradient_checkpointing": True}
            if smaller is not None:
                job.cfg = dataclasses.replace(job.cfg, train=smaller)
                changes = {"micro_batch_size": smaller.micro_batch_size, "grad_accum": smaller.grad_accum}
            self._call_retry(job, changes)
            restart.append(job)
        with self.lock:
            self.pending.extendleft(reversed(restart))

    def _call_retry(self, job: Job, changes: dict[str, Any]) -> None:
        if job.events is not None:
            job.events.put(("on_retry", (job.cfg, job.attempts - 1, changes)))
            return
        try:
            job.hooks.on_retry(job.cfg, job.attempts - 1, changes)
        except BaseException as e:  # handed to the run's caller through its future
            job.future.set_exception(e)
