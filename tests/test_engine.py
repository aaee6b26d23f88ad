"""Many runs in one pass: each trains exactly as it would alone (tiny real 4-bit model on the CPU)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from objectives.base import ResidentBase
from objectives.config import LoraConfig, OptimizerConfig, RecipeConfig, TrainConfig
from objectives.data import TokenizedSplits, prepare
from objectives.engine import SlotEngine
from objectives.objective import RunHooks, RunResult, run_recipe
from objectives.slot_optim import SlotOptimizer
from objectives.slots import PassRows
from objectives.training import LossNotFinite
from sweeper import compose
from tests.conftest import TINY


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RecipeConfig, ResidentBase, TokenizedSplits]]:
    cfg, _ = compose.load([*TINY, "search_space=none", f"output_dir={tmp_path_factory.mktemp('out')}"])
    base = ResidentBase(cfg.model, torch.device("cpu"))
    base.use_checkpointing(False)
    data = prepare(cfg.data, base.tokenizer, cfg.model.cache_path)
    yield cfg, base, data


class Recorder(RunHooks):
    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.evals: list[tuple[int, float]] = []
        self.adapter: dict[str, torch.Tensor] = {}

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.steps.append(metrics)

    def on_eval(self, step: int, loss: float) -> None:
        self.evals.append((step, loss))

    def on_finish(self, result: Any, adapter: Any) -> None:
        self.adapter = adapter.state_dict()


def train_together(engine: SlotEngine, configs: list[RecipeConfig]) -> tuple[list[Recorder], list[RunResult]]:
    """Submit every config to the engine at once, then close it; each run's recorded hooks and its result."""
    try:
        hooks = [Recorder() for _ in configs]
        with engine.lock:  # all of them in the first pass, so repeated runs share passes alike
            futures = [engine.submit(c, h) for c, h in zip(configs, hooks, strict=True)]
        return hooks, [f.result(timeout=600) for f in futures]
    finally:
        engine.close()


def trial(cfg: RecipeConfig, steps: int = 3, **changes: Any) -> RecipeConfig:
    lora = dataclasses.replace(cfg.lora, **{k: v for k, v in changes.items() if k in ("r", "targets", "dropout",
                                                                                      "alpha", "use_rslora")})
    optim = dataclasses.replace(cfg.optimizer, **{k: v for k, v in changes.items()
                                                 if k in ("name", "lr", "momentum", "nesterov", "weight_decay")})
    train = dataclasses.replace(cfg.train, max_steps=steps, eval_every=2, seed=changes.get("seed", 0),
                                micro_batch_size=changes.get("micro_batch_size", 2))
    return RecipeConfig(cfg.model, cfg.data, lora, optim, train)


TRIALS = [
    {"r": 4, "targets": "qk", "name": "adamw", "lr": 1e-3, "dropout": 0.1, "seed": 1},
    {"r": 8, "targets": "all-linear", "name": "sgd", "lr": 5e-2, "momentum": 0.9, "nesterov": True, "seed": 2,
     "dropout": 0.0},
    {"r": 2, "targets": "qkvo", "name": "adamw", "lr": 3e-3, "weight_decay": 0.05, "seed": 3, "dropout": 0.05,
     "micro_batch_size": 3},
]


def run_alone(setup: Any, cfg: RecipeConfig) -> tuple[Recorder, RunResult]:
    _, base, data = setup
    engine = SlotEngine(base, data, slots=1, r_max=8)
    try:
        hooks = Recorder()
        return hooks, engine.run(cfg, hooks)
    finally:
        engine.close()


@pytest.fixture(params=[False, True], ids=["rows", "one-row"])
def one_row(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Each run's packed pass as rows of data.max_length, or as one row (as where the variable-length kernel
    runs): attention on the CPU keeps the examples apart either way."""
    monkeypatch.setattr(SlotEngine, "_one_row_per_run", lambda self: request.param)
    return bool(request.param)


@pytest.mark.parametrize(("order", "lo", "hi", "kind"), [
    ([0, 1, 2], 0, 3, "all"),     # every slot in its own order: the stacked weights as they are
    ([2, 0, 1], 1, 3, "slice"),   # consecutive slots: a view
    ([2, 0, 1], 0, 2, "gather"),
    ([1, 1, 0], 0, 3, "gather"),  # a slot twice (an evaluation's copies of several held-out passes)
])
def test_a_pass_takes_a_range_of_slots_weights_and_gives_their_gradients_back(order: list[int], lo: int, hi: int,
                                                                              kind: str) -> None:
    from objectives.slots import _spread, _take

    rows = PassRows.of([(slot, 0) for slot in order], 1, torch.device("cpu"), slots=3)
    pick = rows.pick(lo, hi)
    assert {"all": pick is None, "slice": isinstance(pick, slice), "gather": isinstance(pick, torch.Tensor)}[kind]
    weights = torch.randn(3, 2, 4, requires_grad=True)
    grad = torch.randn(hi - lo, 2, 4)
    _take(weights, pick).backward(grad)  # autograd's own gradient of the same selection
    assert torch.equal(_spread(grad, pick, weights), weights.grad)


@pytest.mark.parametrize(("reuse", "order", "kept"), [
    (True, [2, 0, 1], True),    # a step's first training pass, its slots gathered
    (False, [2, 0, 1], False),  # a later pass of the step
    (True, [0, 1, 2], False),   # a run of consecutive slots: a view, nothing to keep
])
def test_a_pass_gathers_a_layers_weights_once_and_lets_them_go_in_its_backward(reuse: bool, order: list[int],
                                                                               kept: bool) -> None:
    from objectives.slots import SlotContext, SlotLinear

    layer = SlotLinear(torch.nn.Linear(4, 3, bias=False), 0, 3, 2, SlotContext(3, 8))
    with torch.no_grad():
        for t in (layer.lora_A, layer.lora_B, layer.scaling):
            t.copy_(torch.randn_like(t))
    rows = PassRows.of([(slot, 0) for slot in order], 1, torch.device("cpu"), slots=3)
    rows.reuse = reuse
    forward = rows.weights(layer, 0, 2)
    assert all(torch.equal(got, t[order[:2]]) for got, t in zip(forward, (layer.lora_A, layer.lora_B, layer.scaling),
                                                                strict=True))
    assert (rows.weights(layer, 0, 2) is forward) == kept  # a checkpoint's recomputation
    assert (rows.weights(layer, 0, 2, release=True) is forward) == kept  # backward
    assert not rows._taken
    rows.weights(layer, 0, 2)
    rows.release()  # the pass's end lets go of what a backward that never ran would have
    assert not rows._taken


def test_a_pass_salts_every_layers_dropout_keys_at_once_as_each_layer_would() -> None:
    from objectives.slots import SlotContext, SlotLinear

    ctx = SlotContext(3, 8)
    ctx.dropout = [0.1, 0.0, 0.2]
    layers = [SlotLinear(torch.nn.Linear(4, 4, bias=False), i, 3, 2, ctx) for i in (0, 2)]  # index 1 unused
    keys = [(2, 7), (0, 2**31 + 5), (1, 11)]
    assert ctx.pass_rows(keys, 1, torch.device("cpu")).salted is None  # an evaluation's pass drops nothing
    rows = ctx.pass_rows(keys, 1, torch.device("cpu"), training=True)
    assert rows.salted is not None and rows.salted.shape == (3, 3)
    alone = PassRows.of(keys, 1, torch.device("cpu"), ctx.dropout, 3)  # no table: each layer salts its own
    for layer in layers:
        for lo, hi in ((0, 3), (1, 2)):
            assert all(torch.equal(a, b) for a, b in zip(layer.dropout_of(rows, lo, hi),
                                                         layer.dropout_of(alone, lo, hi), strict=True))


def test_runs_trained_together_match_each_run_alone(setup: Any, one_row: bool) -> None:
    cfg, base, data = setup
    configs = [trial(cfg, **t) for t in TRIALS]
    alone = [run_alone(setup, c) for c in configs]
    engine = SlotEngine(base, data, slots=3, r_max=8)
    hooks, together = train_together(engine, configs)
    for (ref_hooks, ref), hook, got in zip(alone, hooks, together, strict=True):
        assert [s["train_loss"] for s in hook.steps] == pytest.approx([s["train_loss"] for s in ref_hooks.steps],
                                                                     rel=1e-5)
        # A norm of small gradients amplifies float32 rounding, which differs with the batch's shape.
        assert [s["grad_norm"] for s in hook.steps] == pytest.approx([s["grad_norm"] for s in ref_hooks.steps],
                                                                    rel=1e-3)
        assert got.train.eval_loss == pytest.approx(ref.train.eval_loss, rel=1e-5)
        assert got.train.trainable_params == ref.train.trainable_params
        assert hook.adapter.keys() == ref_hooks.adapter.keys()
        for name, tensor in hook.adapter.items():
            torch.testing.assert_close(tensor, ref_hooks.adapter[name], rtol=1e-4, atol=1e-6)


def test_one_slot_trains_like_the_peft_recipe_without_dropout(setup: Any, one_row: bool) -> None:
    """Same init, same data, same loss and optimizer: the slot path and peft's adapter agree."""
    cfg, base, data = setup
    one = trial(cfg, r=4, targets="qkvo", name="adamw", lr=2e-3, dropout=0.0, seed=5)
    hooks, result = run_alone(setup, one)
    peft = Recorder()
    try:
        reference = run_recipe(one, base, data, 2**40, peft)
    finally:
        # The module's base as the fixture left it: an engine records the base's settings in its runs' configs.
        base.release_adapter()
        base.use_checkpointing(False)
        base.use_base_cache(False)
    assert [s["train_loss"] for s in hooks.steps] == pytest.approx([s["train_loss"] for s in peft.steps], rel=1e-4)
    assert result.train.eval_loss == pytest.approx(reference.train.eval_loss, rel=1e-4)
    assert result.train.trainable_params == reference.train.trainable_params


def test_a_nan_run_stops_alone_and_its_neighbours_are_unchanged(setup: Any) -> None:
    cfg, base, data = setup
    healthy = trial(cfg, **TRIALS[0])
    exploding = trial(cfg, r=4, targets="qk", name="sgd", lr=1e30, momentum=0.0, seed=9)
    ref_hooks, ref = run_alone(setup, healthy)
    engine = SlotEngine(base, data, slots=2, r_max=8)
    try:
        hooks = Recorder()
        bad = engine.submit(exploding)
        good = engine.submit(healthy, hooks)
        with pytest.raises(LossNotFinite):
            bad.result(timeout=600)
        got = good.result(timeout=600)
    finally:
        engine.close()
    assert got.train.eval_loss == pytest.approx(ref.train.eval_loss, rel=1e-5)
    for name, tensor in hooks.adapter.items():
        torch.testing.assert_close(tensor, ref_hooks.adapter[name], rtol=1e-4, atol=1e-6)


def test_a_freed_slot_is_refilled_and_a_hook_can_stop_its_run(setup: Any) -> None:
    cfg, base, data = setup

    class StopAtFirstEval(RunHooks):
        def on_eval(self, step: int, loss: float) -> None:
            raise KeyboardInterrupt("pruned")  # any exception a caller raises ends that run only

    engine = SlotEngine(base, data, slots=2, r_max=8)
    try:
        stopped = engine.submit(trial(cfg, steps=4, **TRIALS[0]), StopAtFirstEval())
        long = engine.submit(trial(cfg, steps=6, **TRIALS[1]))
        waiting = engine.submit(trial(cfg, steps=2, **TRIALS[2]))  # takes the stopped run's slot
        with pytest.raises(KeyboardInterrupt):
            stopped.result(timeout=600)
        assert math.isfinite(waiting.result(timeout=600).train.eval_loss)
        assert math.isfinite(long.result(timeout=600).train.eval_loss)
    finally:
        engine.close()


def test_the_slot_adapter_loads_in_peft_and_gives_the_slots_output(setup: Any, tmp_path: Any) -> None:
    from peft import PeftModel

    cfg, base, data = setup
    one = trial(cfg, r=4, targets="qkvo", dropout=0.0, seed=4)
    engine = SlotEngine(base, data, slots=2, r_max=8)
    saved: dict[str, Any] = {}

    class Save(RunHooks):
        def on_finish(self, result: Any, adapter: Any) -> None:
            adapter.save_pretrained(tmp_path)
            ids = torch.tensor([[1, 2, 3, 4, 5]])
            base.model.eval()
            engine.ctx.rows = PassRows.of([(adapter.slot, 0)], 1, torch.device("cpu"))
            with torch.no_grad():
                saved["logits"] = base.model(input_ids=ids).logits
            engine.ctx.rows = None
            base.model.train()

    try:
        engine.submit(one, Save()).result()  # hooks in the engine's thread: the slot is still live
    finally:
        engine.close()
    model = PeftModel.from_pretrained(base.model, str(tmp_path))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4, 5]])).logits
    base.model = model.unload()
    torch.testing.assert_close(logits, saved["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opt", [
    OptimizerConfig(name="adamw", lr=1e-2, weight_decay=0.1, warmup_ratio=0.0, scheduler="constant"),
    OptimizerConfig(name="sgd", lr=1e-1, momentum=0.9, nesterov=True, weight_decay=0.01, warmup_ratio=0.0,
                    scheduler="constant"),
    OptimizerConfig(name="sgd", lr=1e-1, momentum=0.9, warmup_ratio=0.0, scheduler="constant"),
    OptimizerConfig(name="sgd", lr=1e-1, momentum=0.0, warmup_ratio=0.0, scheduler="constant"),
])
@pytest.mark.parametrize("shape", [(5, 4), (20,)])
def test_the_slot_optimizer_is_torchs_per_slot(opt: OptimizerConfig, shape: tuple[int, ...]) -> None:
    # The slots not stepped hold a NaN and an infinite gradient: neither reaches their weights or state.
    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(3, *shape))
    alone = torch.nn.Parameter(stacked.detach()[1].clone())
    slots = SlotOptimizer([stacked], 3)
    slots.reset(1, opt, total_steps=10)
    if opt.name == "adamw":
        reference: torch.optim.Optimizer = torch.optim.AdamW([alone], lr=opt.lr, weight_decay=opt.weight_decay,
                                                             foreach=False)
    else:
        reference = torch.optim.SGD([alone], lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov,
                                    weight_decay=opt.weight_decay, foreach=False)
    untouched = [t.detach()[[0, 2]].clone() for t in (stacked, *slots.exp_avg, *slots.exp_avg_sq)]
    for _ in range(4):
        stacked.grad = None  # a step with no gradient at all: as torch's, it counts no step
        slots.step([1])
        grad = torch.randn(shape)
        stacked.grad = torch.stack([torch.full(shape, math.nan), grad, torch.full(shape, math.inf)])
        alone.grad = grad.clone()
        slots.clip(slots.grad_norms(), [math.inf] * 3)
        slots.step([1])
        reference.step()
    torch.testing.assert_close(stacked.detach()[1], alone.detach(), rtol=1e-5, atol=1e-6)
    for before, t in zip(untouched, (stacked, *slots.exp_avg, *slots.exp_avg_sq), strict=True):
        assert torch.equal(t.detach()[[0, 2]], before)
    assert TrainConfig().max_steps > 0 and LoraConfig().r > 0


def test_out_of_memory_halves_the_slots_then_the_micro_batch_and_runs_start_over(setup: Any) -> None:
    """The 'device' holds at most 2 training rows per pass: 3 slots of 2 rows -> 1 slot -> 1 row + accumulation."""
    cfg, base, data = setup
    configs = [trial(cfg, **t) for t in TRIALS[:2]]
    alone = [run_alone(setup, c) for c in configs]

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if torch.is_grad_enabled() and args[0].shape[0] > 1:
            raise torch.OutOfMemoryError(f"out of memory: {args[0].shape[0]} rows (test limit 1)")

    class Retries(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.retries: list[dict[str, Any]] = []

        def on_retry(self, cfg: RecipeConfig, attempt: int, changes: dict[str, Any]) -> None:
            self.retries.append(changes)

    engine = SlotEngine(base, data, slots=3, r_max=8)
    handle = base.model.get_input_embeddings().register_forward_pre_hook(hook)
    try:
        hooks = [Retries() for _ in configs]
        results = [f.result(timeout=600) for f in [engine.submit(c, h) for c, h in zip(configs, hooks, strict=True)]]
    finally:
        handle.remove()
        engine.close()
    assert engine.capacity == 1
    assert {"slots": 1} in hooks[0].retries
    assert any("micro_batch_size" in r for r in hooks[0].retries)
    for (_, ref), got in zip(alone, results, strict=True):
        assert got.config.train.micro_batch_size == 1
        assert got.train.eval_loss == pytest.approx(ref.train.eval_loss, rel=1e-3)  # same examples per step


def test_out_of_memory_in_a_pass_without_checkpointing_turns_it_on_for_every_pass_at_the_same_slots(
        setup: Any) -> None:
    """The memory model let a pass go without checkpointing and the 'device' disagrees: the runs start over with
    checkpointing on every pass, in as many slots as before."""
    cfg, base, data = setup
    configs = [trial(cfg, **t) for t in TRIALS[:2]]

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if torch.is_grad_enabled() and not base.checkpointing:
            raise torch.OutOfMemoryError("out of memory: a pass without checkpointing (test)")

    retries: list[dict[str, Any]] = []

    class Retries(Recorder):
        def on_retry(self, cfg: RecipeConfig, attempt: int, changes: dict[str, Any]) -> None:
            retries.append(changes)

    engine = SlotEngine(base, data, slots=2, r_max=8, per_pass=lambda rows, width, routed: False)
    handle = base.model.get_input_embeddings().register_forward_pre_hook(hook)
    try:
        hooks = [Retries() for _ in configs]
        with engine.lock:  # both in the first pass
            futures = [engine.submit(c, h) for c, h in zip(configs, hooks, strict=True)]
        results = [f.result(timeout=600) for f in futures]
    finally:
        handle.remove()
        engine.close()
        base.use_checkpointing(False)
    assert engine.capacity == 2 and engine.per_pass is None
    assert retries == [{"gradient_checkpointing": True}] * 2
    assert all(len(h.steps) == 3 for h in hooks) and all(r.train.eval_loss > 0 for r in results)


def test_run_calls_the_hooks_in_the_callers_thread_and_a_raising_hook_stops_the_run(setup: Any) -> None:
    import threading

    cfg, base, data = setup
    caller = threading.get_ident()

    class Stop(Recorder):
        def on_eval(self, step: int, loss: float) -> None:
            assert threading.get_ident() == caller
            raise ValueError(f"stopped at {step}")

    engine = SlotEngine(base, data, slots=2, r_max=8)
    try:
        hooks = Recorder()
        with pytest.raises(ValueError, match="stopped at 2"):
            engine.run(trial(cfg, steps=6, **TRIALS[0]), Stop())
        result = engine.run(trial(cfg, **TRIALS[1]), hooks)  # the slot was freed and is reused
    finally:
        engine.close()
    assert math.isfinite(result.train.eval_loss) and hooks.adapter


def test_slots_on_the_base_cache_train_as_on_the_4bit_layers(setup: Any) -> None:
    """The kept copy holds what bitsandbytes dequantizes in every call: the same forward, bit for bit (see
    test_training). With the copy a layer's base and adapters are one autograd node, which sums the input's
    gradients in another order: float rounding from the first update on. With checkpointing, the recomputation
    takes the weights its forward gathered."""
    cfg, base, data = setup
    configs = [trial(cfg, **t) for t in TRIALS]  # ordered in a pass as all-linear, qkvo, qk: every kind of range
    runs = {}
    try:
        for cache, checkpointing in ((False, False), (True, False), (True, True)):
            base.use_base_cache(cache)
            base.use_checkpointing(checkpointing)
            engine = SlotEngine(base, data, slots=3, r_max=8)
            hooks, results = train_together(engine, configs)
            assert all(r.config.model.base_cache is cache for r in results)  # the run records what trained it
            assert all(r.config.model.gradient_checkpointing is checkpointing for r in results)
            runs[cache, checkpointing] = [([s["train_loss"] for s in h.steps], r.train.eval_loss, h.adapter)
                                          for h, r in zip(hooks, results, strict=True)]
    finally:
        base.use_base_cache(False)
        base.use_checkpointing(False)
    for (losses, eval_loss, adapter), (ref_losses, ref_eval, ref_adapter) in zip(
            runs[True, False] + runs[True, True], runs[False, False] * 2, strict=True):
        assert losses[0] == ref_losses[0]
        assert losses == pytest.approx(ref_losses, rel=1e-5) and eval_loss == pytest.approx(ref_eval, rel=1e-5)
        for k in ref_adapter:
            torch.testing.assert_close(adapter[k], ref_adapter[k], rtol=1e-4, atol=1e-6)


def test_checkpointing_switched_per_pass_trains_as_without_it(setup: Any) -> None:
    """``PassCheckpointing`` turns checkpointing on and off between passes: recomputation redraws the same
    dropout masks, so the runs train the same as with it off throughout."""
    cfg, base, data = setup
    configs = [trial(cfg, **t) for t in TRIALS[:2]]
    asked: list[tuple[int, int]] = []

    def every_other_pass(rows: int, width: int, routed: bool) -> bool:
        assert not routed  # no variable-length kernel on the CPU
        asked.append((rows, width))
        return len(asked) % 2 == 1

    runs = []
    try:
        for per_pass in (None, every_other_pass):
            engine = SlotEngine(base, data, slots=2, r_max=8, per_pass=per_pass)
            hooks, results = train_together(engine, configs)
            runs.append([([s["train_loss"] for s in h.steps], r.train.eval_loss, h.adapter)
                         for h, r in zip(hooks, results, strict=True)])
    finally:
        base.use_checkpointing(False)
    assert len(asked) == 3 and all(rows % 2 == 0 and width <= data.max_length for rows, width in asked)
    assert engine.checkpointed == {True: 2, False: 1}  # the rule's answers, not the base's setting
    for (losses, eval_loss, adapter), (ref_losses, ref_eval, ref_adapter) in zip(*runs, strict=True):
        assert losses == pytest.approx(ref_losses, rel=1e-6) and eval_loss == pytest.approx(ref_eval, rel=1e-6)
        for k in ref_adapter:
            torch.testing.assert_close(adapter[k], ref_adapter[k], rtol=1e-5, atol=1e-7)


def test_the_head_on_the_predicted_tokens_alone_gives_the_full_logits_losses(setup: Any) -> None:
    """A plain head's logits at the tokens a pass predicts, against every position's logits row by row (the path
    of heads that scale or cap their logits)."""
    cfg, base, data = setup
    configs = [trial(cfg, **t) for t in TRIALS]
    runs = {}
    for at_targets in (True, False):
        engine = SlotEngine(base, data, slots=3, r_max=8)
        assert engine.head_at_targets  # a Llama
        engine.head_at_targets = at_targets
        hooks, results = train_together(engine, configs)
        runs[at_targets] = [([s["train_loss"] for s in h.steps], r.train.eval_loss, h.adapter)
                            for h, r in zip(hooks, results, strict=True)]
    for (losses, eval_loss, adapter), (ref_losses, ref_eval, ref_adapter) in zip(runs[True], runs[False],
                                                                                 strict=True):
        assert losses == pytest.approx(ref_losses, rel=1e-5) and eval_loss == pytest.approx(ref_eval, rel=1e-5)
        for k in ref_adapter:
            torch.testing.assert_close(adapter[k], ref_adapter[k], rtol=1e-4, atol=1e-6)


@pytest.mark.usefixtures("reference_fused_loss")  # the engine's per-run sums
def test_fused_loss_passes_give_each_run_its_own_loss(setup: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from objectives import loss

    monkeypatch.setattr(loss, "fused_loss_unavailable", lambda *args: None)
    cfg, base, data = setup
    configs = [trial(cfg, **t) for t in TRIALS]
    runs = {}
    for fused in (False, True):
        engine = SlotEngine(base, data, slots=3, r_max=8, fused_loss=fused)
        hooks, results = train_together(engine, configs)
        assert all(r.config.train.fused_loss is fused for r in results)
        runs[fused] = [([s["train_loss"] for s in h.steps], r.train.eval_loss) for h, r in zip(hooks, results,
                                                                                              strict=True)]
    for (losses, eval_loss), (ref_losses, ref_eval) in zip(runs[True], runs[False], strict=True):
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        assert eval_loss == pytest.approx(ref_eval, rel=1e-5)


def test_hooks_run_in_turns_with_the_engine_and_the_runs_train_the_same(setup: Any) -> None:
    """On CUDA the engine and its runs' hooks take turns at the interpreter: here forced on, on the CPU."""
    import threading

    from objectives.host_turns import TURNS

    cfg, base, data = setup
    configs = [trial(cfg, **t) for t in TRIALS]
    engine = SlotEngine(base, data, slots=3, r_max=8)
    _, reference = train_together(engine, configs)
    engine = SlotEngine(base, data, slots=3, r_max=8, host_turns=True)
    assert TURNS.active
    results: dict[int, RunResult] = {}

    def run(i: int) -> None:
        results[i] = engine.run(configs[i], Recorder())

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(configs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    finally:
        engine.close()
    assert not TURNS.active
    for i, ref in enumerate(reference):
        assert results[i].train.eval_loss == pytest.approx(ref.train.eval_loss, rel=1e-5)


def test_the_engines_turn_holds_bookkeeping_back_and_waiting_sections_go_before_its_next_turn() -> None:
    import threading
    import time

    from objectives.host_turns import HostTurns

    turns = HostTurns()
    with turns.bookkeeping(), turns.bookkeeping():  # inactive: nobody waits, sections nest
        pass
    turns.active = True
    order: list[str] = []

    def keep_books(name: str) -> None:
        with turns.bookkeeping(), turns.bookkeeping():  # a nested section takes no second turn
            order.append(name)

    turns.take()
    clerks = [threading.Thread(target=keep_books, args=(f"clerk{i}",)) for i in range(3)]
    for t in clerks:
        t.start()
    time.sleep(0.2)
    order.append("engine launched")
    with turns.waiting():  # the engine waits for the device: the clerks go
        for t in clerks:
            t.join(timeout=5)
    order.append("engine again")
    assert order[0] == "engine launched" and sorted(order[1:4]) == ["clerk0", "clerk1", "clerk2"]
    assert order[4] == "engine again"
    late = threading.Thread(target=keep_books, args=("late",))
    late.start()
    time.sleep(0.1)
    assert "late" not in order  # still the engine's turn
    turns.stop()  # the engine is gone: everyone waiting goes
    late.join(timeout=5)
    assert order[-1] == "late"


def test_a_section_waits_for_a_lock_outside_itself_so_the_engine_does_not_wait_for_it() -> None:
    import threading
    import time

    from objectives.host_turns import HostTurns, PatientLock

    turns = HostTurns()
    turns.active = True
    lock = PatientLock(turns=turns)
    lock.acquire()  # held outside any section, as a heartbeat's write holds the study's storage
    entered = threading.Event()

    def keep_books() -> None:
        with turns.bookkeeping():
            entered.set()
            with lock:
                pass

    clerk = threading.Thread(target=keep_books)
    clerk.start()
    assert entered.wait(timeout=5)
    deadline = time.monotonic() + 5
    while turns._inside and time.monotonic() < deadline:
        time.sleep(0.01)
    assert turns._inside == 0  # the clerk queues for the lock outside its section
    turns.take()
    assert turns._holding and clerk.is_alive()
    lock.release()  # the clerk takes it and ends its section beside the engine's turn
    clerk.join(timeout=5)
    assert not clerk.is_alive() and turns._inside == 0
    turns.give_up()
    turns.stop()


# --- the engine in a process of its own (objectives.engine_process) ------------------------------------------


def engine_spec(setup: Any, slots: int, **changes: Any) -> Any:
    from objectives.engine_process import EngineSpec

    cfg, base, data = setup
    spec = EngineSpec(cfg.model, "cpu", data, slots, r_max=8, checkpointing=base.checkpointing, base_cache=False,
                      eval_batch_size=4, packing=True, fused_loss="auto")
    return dataclasses.replace(spec, **changes)


def run_in_threads(engine: Any, configs: list[RecipeConfig],
                   hooks: list[Recorder]) -> list[RunResult | BaseException]:
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> RunResult | BaseException:
        try:
            return engine.run(configs[i], hooks[i])  # type: ignore[no-any-return]
        except BaseException as e:
            return e

    with ThreadPoolExecutor(len(configs)) as pool:
        return list(pool.map(one, range(len(configs))))


def test_runs_in_the_engines_own_process_match_each_run_alone(setup: Any) -> None:
    """The same runs as the in-thread engine's parity test, each from a thread of its own (as a sweep's trials):
    the hooks come back from the child in order, and the adapter crosses intact. The child was started, and loaded
    the base, before the spec existed, as a launch starts it; one closed unused ends."""
    from objectives.engine_process import EngineProcess, Prestarted

    cfg, _, _ = setup
    unused = Prestarted()
    unused.close()
    assert not unused.process.is_alive()
    configs = [trial(cfg, **t) for t in TRIALS]
    child = Prestarted(model=cfg.model, device="cpu")  # it loads the base while the runs alone train
    alone = [run_alone(setup, c) for c in configs]
    engine = EngineProcess(engine_spec(setup, slots=3), child)
    assert engine.process is child.process
    try:
        hooks = [Recorder() for _ in configs]
        results = run_in_threads(engine, configs, hooks)
    finally:
        engine.close()
    assert not engine.process.is_alive()
    for (ref_hooks, ref), hook, got in zip(alone, hooks, results, strict=True):
        assert isinstance(got, RunResult), got
        assert [s["train_loss"] for s in hook.steps] == pytest.approx([s["train_loss"] for s in ref_hooks.steps],
                                                                     rel=1e-5)
        assert [step for step, _ in hook.evals] == [step for step, _ in ref_hooks.evals]
        assert got.train.eval_loss == pytest.approx(ref.train.eval_loss, rel=1e-5)
        assert got.config == ref.config
        assert hook.adapter.keys() == ref_hooks.adapter.keys()
        for name, tensor in hook.adapter.items():
            torch.testing.assert_close(tensor, ref_hooks.adapter[name], rtol=1e-4, atol=1e-6)


def test_a_pool_gives_each_run_to_the_engine_with_the_fewest_runs() -> None:
    import threading

    from objectives.engine_process import EnginePool

    release = threading.Event()

    class Engine:
        def __init__(self) -> None:
            self.runs: list[Any] = []
            self.closed = False
            self.usable = True

        def run(self, cfg: Any, hooks: Any = None) -> Any:
            self.runs.append(cfg)
            release.wait(timeout=30)
            return cfg

        def close(self) -> None:
            self.closed = True
            raise RuntimeError("this one fails to close")

    engines = [Engine(), Engine()]
    pool = EnginePool(engines)  # type: ignore[list-item]
    threads = [threading.Thread(target=pool.run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    while sum(len(e.runs) for e in engines) < 4:
        threading.Event().wait(0.01)
    assert sorted(len(e.runs) for e in engines) == [2, 2]
    release.set()
    for t in threads:
        t.join(timeout=30)
    assert pool.run(7) == 7 and len(engines[0].runs) == 3  # both idle: the first
    engines[0].usable = False  # its child died past its restarts
    assert pool.run(8) == 8 and engines[1].runs[-1] == 8
    with pytest.raises(RuntimeError, match="fails to close"):
        pool.close()
    assert all(e.closed for e in engines)  # the second closed although the first raised


def test_a_raising_hook_stops_its_run_in_the_child_and_a_dead_child_is_replaced(setup: Any) -> None:
    import os
    import signal
    import threading

    from objectives.engine_process import EngineProcess, EngineProcessDied

    cfg, _, _ = setup
    caller = threading.get_ident()

    class Stop(Recorder):
        def on_eval(self, step: int, loss: float) -> None:
            assert threading.get_ident() == caller
            raise ValueError(f"stopped at {step}")

    class KillAtFirstStep(Recorder):
        def on_step(self, step: int, metrics: dict[str, float]) -> None:
            os.kill(engine.process.pid, signal.SIGKILL)

    engine = EngineProcess(engine_spec(setup, slots=2))
    try:
        with pytest.raises(ValueError, match="stopped at 2"):
            engine.run(trial(cfg, steps=6, **TRIALS[0]), Stop())
        first = engine.process
        with pytest.raises(EngineProcessDied, match="exit code -9"):
            engine.run(trial(cfg, steps=40, **TRIALS[1]), KillAtFirstStep())
        hooks = Recorder()
        result = engine.run(trial(cfg, **TRIALS[1]), hooks)  # a fresh child trains it
    finally:
        engine.close()
    assert engine.process is not first and engine.restarts == 1
    assert math.isfinite(result.train.eval_loss) and hooks.adapter and len(hooks.steps) == 3


def test_a_base_the_child_cannot_load_fails_the_engine_with_the_childs_reason(setup: Any, tmp_path: Any) -> None:
    from objectives.engine_process import EngineProcess

    cfg, _, _ = setup
    model = dataclasses.replace(cfg.model, source=str(tmp_path / "missing"), random_init=False)
    with pytest.raises(Exception, match="missing"):
        EngineProcess(engine_spec(setup, slots=2, model=model))


def test_a_job_stopped_while_it_waited_leaves_the_running_slots_alone(setup: Any) -> None:
    """Its stop reaches it when a slot frees; it never takes one, and the run in the last slot keeps its adapter."""
    cfg, base, data = setup
    engine = SlotEngine(base, data, slots=2, r_max=8, start=False)
    try:
        short = engine.submit(trial(cfg, steps=1, **TRIALS[0]))
        engine.submit(trial(cfg, steps=6, **TRIALS[1]))
        waiting = engine.submit(trial(cfg, **TRIALS[2]))
        engine.pending[-1].stop = ValueError("pruned while it waited")
        engine.advance()  # both admitted; the short run ends after its one step
        assert short.done() and list(engine.running) == [1]
        used = [bool(layer.used[1]) for layer in engine.wrapped.values()]
        engine.advance()  # the stopped job is taken out of line
        with pytest.raises(ValueError, match="pruned while it waited"):
            waiting.result(timeout=0)
        assert [bool(layer.used[1]) for layer in engine.wrapped.values()] == used and any(used)
    finally:
        engine.close()


def test_a_process_that_exits_without_closing_the_engine_ends_its_child(setup: Any, tmp_path: Any) -> None:
    import pickle
    import subprocess
    import sys

    import psutil

    from tests.conftest import ROOT

    spec = tmp_path / "spec.pickle"
    spec.write_bytes(pickle.dumps(engine_spec(setup, slots=2)))
    script = ("import pickle, sys\nfrom objectives.engine_process import EngineProcess\n"
              f"engine = EngineProcess(pickle.loads(open({str(spec)!r}, 'rb').read()))\n"
              "print(engine.process.pid, flush=True)\n")  # and exits, the engine still open
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not psutil.pid_exists(int(done.stdout.split()[-1]))
