"""The training loop's stop rule: a non-finite loss or gradient norm ends the trial before the update."""

from __future__ import annotations

import dataclasses
import math
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from objectives.config import LoraConfig
from objectives.training import LossNotFinite, train_adapter
from sweeper import compose
from sweeper.launch import Resources
from tests.conftest import TINY, step_losses


@pytest.mark.parametrize("scale", [math.inf, math.nan])
def test_a_non_finite_gradient_stops_before_the_update(tmp_path: Path, scale: float) -> None:
    cfg, _ = compose.load([*TINY, "search_space=none", "train.max_grad_norm=0", f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    with res.base.adapter(LoraConfig(r=4, targets="qk"), seed=0) as model:
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        handle = params[0].register_hook(lambda grad: grad * scale)
        try:
            with pytest.raises(LossNotFinite, match="gradient norm is (inf|nan) at step 1"):
                train_adapter(model, res.data, cfg.train, cfg.optimizer, res.base.device,
                              res.base.tokenizer.pad_token_id)
        finally:
            handle.remove()
        assert all(torch.equal(a, p.detach()) for a, p in zip(before, params, strict=True))


def test_checkpointing_auto_turns_it_off_when_the_trial_fits_and_changes_no_result(tmp_path: Path) -> None:
    """Non-reentrant checkpointing replays dropout's random state: the same loss with it on or off."""
    import dataclasses

    import optuna

    from sweeper.objective import QLoRAObjective

    cfg, _ = compose.load([*TINY, "search_space=none", "lora.dropout=0.1", f"output_dir={tmp_path}"])
    assert cfg.model.gradient_checkpointing == "auto"
    res = Resources.load(cfg)
    values = []
    for setting in (True, "auto", False, True):  # on as loaded, off, off, on again
        trial_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, gradient_checkpointing=setting))
        trial = optuna.trial.FixedTrial({})
        values.append(QLoRAObjective(trial_cfg, [], res.base, res.data, None, show_progress=False)(trial))
        ran = trial.user_attrs["config"]["model"]["gradient_checkpointing"]
        assert ran is (setting if setting != "auto" else False)  # the tiny model fits: auto runs without it
        assert res.base.checkpointing is ran
    assert values[1] == values[2] == pytest.approx(values[0], rel=1e-5)
    assert values[3] == values[0]


@pytest.mark.parametrize(("scheduler", "reference"), [("cosine", "cosine"), ("linear", "linear"),
                                                      ("constant", "constant_with_warmup")])
@pytest.mark.parametrize(("warmup_ratio", "steps"), [(0.1, 20), (0.1, 12), (0.0, 8), (0.2, 24), (0.15, 7)])
def test_the_schedule_is_transformers_schedule_with_a_trainers_warmup_ratio(
        scheduler: str, reference: str, warmup_ratio: float, steps: int) -> None:
    from transformers import get_scheduler

    from objectives.config import OptimizerConfig
    from objectives.training import lr_lambda

    warmup = math.ceil(warmup_ratio * steps)  # TrainingArguments.get_warmup_steps
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_scheduler(reference, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    expected = []
    for _ in range(steps):
        expected.append(theirs.get_last_lr()[0])
        optimizer.step()
        theirs.step()
    ours = lr_lambda(OptimizerConfig(scheduler=scheduler, warmup_ratio=warmup_ratio), steps)
    assert [ours(step) for step in range(steps)] == pytest.approx(expected, abs=1e-12)


def test_a_loaded_base_runs_no_code_from_the_hub(tmp_path: Path) -> None:
    """Remote code is off unless the user turns it on, and so are hub kernels, which transformers turns on from
    5.25: every ``train()`` would then put their forward back on the layers they decorate."""
    cfg, _ = compose.load([*TINY, "search_space=none", f"output_dir={tmp_path}"])
    assert cfg.model.trust_remote_code is False
    res = Resources.load(cfg)
    model = res.base.model
    for mode in (True, False, True):
        model.train(mode)
    assert not getattr(model, "use_kernels", False)
    assert res.base.lean_layers and "forward" in model.get_submodule("model.norm").__dict__


def test_an_adapter_reused_in_place_trains_like_a_freshly_injected_one(tmp_path: Path) -> None:
    import optuna

    from sweeper.objective import QLoRAObjective

    cfg, _ = compose.load([*TINY, "search_space=none", "lora.dropout=0.1", f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    objective = QLoRAObjective(cfg, [], res.base, res.data, None, show_progress=False)
    fresh = objective(optuna.trial.FixedTrial({}))  # the first trial injects the adapter
    reused = objective(optuna.trial.FixedTrial({}))  # the same shape: re-initialised in place
    assert reused == fresh


def test_a_released_adapter_is_freed_without_a_garbage_collection(tmp_path: Path) -> None:
    """Releasing skips the full collection (~0.5 s per change of adapter shape): that is only safe while
    nothing of a trained adapter sits in a reference cycle."""
    import gc
    import weakref

    import optuna

    from sweeper.objective import QLoRAObjective

    cfg, _ = compose.load([*TINY, "search_space=none", f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    QLoRAObjective(cfg, [], res.base, res.data, None, show_progress=False)(optuna.trial.FixedTrial({}))
    lora = [weakref.ref(p) for name, p in res.base.model.named_parameters() if "lora_" in name]
    assert lora
    gc.disable()
    try:
        res.base.release_adapter()
        assert not [ref for ref in lora if ref() is not None]
    finally:
        gc.enable()


# --- model.base_cache: the 4-bit layers multiply with a kept dequantized copy ----------------------------
# On the CPU the copy holds exactly the values bitsandbytes dequantizes in every call (the same kernel, into the
# same dtype) and the layer runs the same product on them, so outputs, losses and gradients are bit-identical:
# the tests compare exactly. (On CUDA, bitsandbytes 0.50 multiplies passes of a few hundred tokens with a fused
# 4-bit kernel whose rounding differs within bf16's precision.)

def test_the_base_cache_gives_the_4bit_paths_outputs_losses_and_adapter(tmp_path: Path) -> None:
    from peft import PeftModel

    from objectives.base import ResidentBase
    from objectives.base_cache import BUFFER, cached

    cfg, _ = compose.load([*TINY, "search_space=none", "lora.dropout=0.1", "lora.targets=all-linear",
                           "model.base_cache=off", f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    assert not res.base.base_cache and not cached(res.base.model)
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for cache in (False, True):
        res.base.use_base_cache(cache)
        with res.base.adapter(LoraConfig(r=4, targets="all-linear"), seed=0) as model:
            torch.nn.init.normal_(next(p for n, p in model.named_parameters() if "lora_B" in n))  # a live adapter
            model.eval()
            with torch.no_grad():
                outputs[cache] = model(input_ids=ids).logits
    assert torch.equal(outputs[True], outputs[False])

    train = dataclasses.replace(cfg.train, max_steps=3, eval_every=3)
    plain = step_losses(res, cfg, train, cache=False)
    with_cache = step_losses(res, cfg, train, cache=True)
    assert with_cache == plain  # per-step train losses (dropout on) and the eval loss, exactly

    # The layers stay Linear4bit under peft's wrapper, the copy stays out of the saved adapter, and the adapter
    # loads into peft on the plain 4-bit base with the same output.
    assert cached(res.base.model)
    with res.base.adapter(cfg.lora, seed=0) as model:
        wrapped = model.base_model.model.model.layers[0].self_attn.q_proj
        assert type(wrapped.base_layer).__name__ == "Linear4bit" and BUFFER in wrapped.base_layer._buffers
        torch.nn.init.normal_(wrapped.lora_B["default"].weight)
        model.save_pretrained(tmp_path / "adapter")
        assert not any(BUFFER in key for key in model.state_dict())
        model.eval()
        with torch.no_grad():
            trained = model(input_ids=ids).logits
    fresh = ResidentBase(cfg.model, res.base.device)
    assert not cached(fresh.model)
    loaded = PeftModel.from_pretrained(fresh.model, str(tmp_path / "adapter"))
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, trained)


@pytest.mark.parametrize(("device", "x", "weight", "bias", "expected"), [
    ("cuda", torch.float32, torch.bfloat16, False, True),
    ("cuda", torch.float32, torch.float16, False, True),
    ("cuda", torch.float32, torch.bfloat16, True, False),  # the bias is added in 16 bits, as bitsandbytes does
    ("cuda", torch.bfloat16, torch.bfloat16, False, False),  # 16-bit activations: nothing to widen
    ("cuda", torch.float32, torch.float32, False, False),
    ("cpu", torch.float32, torch.bfloat16, False, False),  # no 16-bit product writes fp32 on the CPU
])
def test_the_base_product_writes_fp32_only_on_cuda_for_16_bit_weights(device: str, x: torch.dtype,
                                                                      weight: torch.dtype, bias: bool,
                                                                      expected: bool) -> None:
    from objectives.base_cache import widens

    class Probe:  # a tensor's device and dtype, without a CUDA device to put one on
        def __init__(self, dtype: torch.dtype) -> None:
            self.is_cuda, self.dtype = device == "cuda", dtype

    assert widens(Probe(x), Probe(weight), Probe(weight) if bias else None) is expected  # type: ignore[arg-type]


def test_products_of_one_unchanged_input_share_its_16_bit_cast() -> None:
    from objectives.base_cache import _narrow

    x = torch.randn(3, 5)
    first = _narrow(x, torch.bfloat16)
    assert torch.equal(first, x.to(torch.bfloat16)) and not first.requires_grad
    assert _narrow(x, torch.bfloat16) is first  # q, k and v read one input: one cast
    assert _narrow(x.clone(), torch.bfloat16) is not first  # another tensor, however equal
    assert _narrow(x, torch.float16).dtype == torch.float16
    x.mul_(2)  # changed in place: cast again
    again = _narrow(x, torch.bfloat16)
    assert again is not first and torch.equal(again, x.to(torch.bfloat16))
    threads: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda t: threads.append(_narrow(t, torch.bfloat16)), args=(x,))
    worker.start()
    worker.join()
    del worker
    assert threads[0] is not again  # each thread (an engine of its own) keeps its own
    cast = weakref.ref(again)
    del x, again
    assert cast() is None  # forgotten with its input: no activation's copy kept past its layer


def test_a_trial_decides_the_base_cache_from_the_memory_model(tmp_path: Path) -> None:
    import optuna

    from objectives.decisions import fits, with_base_cache
    from sweeper.objective import QLoRAObjective

    cfg, _ = compose.load([*TINY, "search_space=none", "train.max_steps=1", f"output_dir={tmp_path}"])
    assert cfg.model.base_cache == "auto"
    res = Resources.load(cfg)
    assert not res.base.base_cache  # "auto" loads without the copy: a trial decides
    with_copy = fits(with_base_cache(cfg, True), res.base.config, 0, res.base.linear_names)[1]
    values = {}
    for memory, expected in ((2**50, True), (with_copy - 1, False)):
        objective = QLoRAObjective(cfg, [], res.base, res.data, None, show_progress=False)
        objective.memory_bytes = memory
        trial = optuna.trial.FixedTrial({})
        values[expected] = objective(trial)
        assert trial.user_attrs["config"]["model"]["base_cache"] is expected
        assert res.base.base_cache is expected
    assert values[True] == values[False]


# --- train.fused_loss: the plumbing around liger-kernel's kernel, with a plain reference in its place ------
# (conftest.ReferenceFusedLoss): the shifted labels, the normalisation over the step's tokens, evaluation.


@pytest.mark.usefixtures("reference_fused_loss")
def test_the_fused_loss_path_trains_like_the_models_loss(tmp_path: Path) -> None:
    cfg, _ = compose.load([*TINY, "search_space=none", "train.max_steps=3", "train.grad_accum=2",
                           "model.gradient_checkpointing=false", f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    runs = {fused: step_losses(res, cfg, dataclasses.replace(cfg.train, fused_loss=fused)) for fused in (False, True)}
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-5)


def test_fused_loss_on_where_it_cannot_run_names_the_field(tmp_path: Path) -> None:
    from objectives.config import ConfigError
    from objectives.decisions import resolve_fused_loss

    cfg, _ = compose.load([*TINY, "search_space=none", "train.fused_loss=on", f"output_dir={tmp_path}"])
    assert cfg.train.fused_loss is True
    with pytest.raises(ConfigError, match="train.fused_loss: on, but it needs CUDA"):
        resolve_fused_loss(cfg, "cpu")
    auto = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fused_loss="auto"))
    assert resolve_fused_loss(auto, "cpu").train.fused_loss is False


def test_fused_loss_auto_is_taken_only_where_full_logits_would_not_fit(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """It saves memory and costs time: on a device where it can run, ``auto`` is on only for a trial that does not
    fit with full logits (and no checkpointing), and checkpointing is then decided with it."""
    import objectives.loss
    from objectives.decisions import fits, resolve_fused_loss, resolve_trial, with_checkpointing, with_fused_loss
    from objectives.sources import load_model_config

    monkeypatch.setattr(objectives.loss, "fused_loss_unavailable", lambda *args: None)  # as on CUDA with liger
    cfg, _ = compose.load([*TINY, "search_space=none", "data.max_length=512", f"output_dir={tmp_path}"])
    assert cfg.train.fused_loss == "auto" and cfg.model.gradient_checkpointing == "auto"
    config = load_model_config(cfg.model)
    plain = fits(with_checkpointing(with_fused_loss(cfg, False), False), config, 2**62)[1]
    fused = fits(with_checkpointing(with_fused_loss(cfg, True), False), config, 2**62)[1]
    assert fused < plain
    assert resolve_fused_loss(cfg, "cuda", config, plain).train.fused_loss is False
    squeezed = resolve_trial(cfg, config, (plain + fused) // 2, "cuda")
    assert squeezed.train.fused_loss is True and squeezed.model.gradient_checkpointing is False
    assert resolve_fused_loss(cfg, "cuda", config).train.fused_loss is True  # no memory given: wherever it runs
    # nothing fits: every saving is taken
    assert resolve_trial(cfg, config, 1, "cuda").train.fused_loss is True
    # deep, with a small vocabulary: the fused loss saves too little, checkpointing alone does it
    deep, _ = compose.load([*TINY, "search_space=none", "data.max_length=512", f"output_dir={tmp_path}",
                            "++model.config_overrides.num_hidden_layers=32", "++model.config_overrides.vocab_size=512"])
    config = load_model_config(deep.model)
    checkpointed = fits(with_checkpointing(with_fused_loss(deep, False), True), config, 2**62)[1]
    assert checkpointed < fits(with_checkpointing(with_fused_loss(deep, True), False), config, 2**62)[1]
    tight = resolve_trial(deep, config, checkpointed, "cuda")
    assert tight.train.fused_loss is False and tight.model.gradient_checkpointing is True


# --- model.upcast_unquantized=false: a bf16 activation stream -------------------------------------------

@pytest.mark.parametrize(("upcast", "dtype"), [(True, torch.float32), (False, torch.bfloat16)])
def test_attention_gets_the_activation_streams_dtype(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upcast: bool,
                                                     dtype: torch.dtype) -> None:
    """Without peft's upcast, sdpa gets bf16 queries, keys and values (on CUDA its flash or memory-efficient
    kernel: grouped-query heads go to it unrepeated when there is no mask); with it, fp32 (the math kernel)."""
    seen: list[set[torch.dtype]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append({q.dtype, k.dtype, v.dtype})
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    cfg, _ = compose.load([*TINY, "search_space=none", f"model.upcast_unquantized={str(upcast).lower()}",
                           "model.gradient_checkpointing=false", f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with res.base.adapter(LoraConfig(r=4, targets="qkvo"), seed=0) as model:
        model.train()
        seen.clear()
        model(input_ids=ids, labels=ids).loss.backward()
    assert len(seen) == cfg.model.config_overrides["num_hidden_layers"]
    assert all(s == {dtype} for s in seen)
