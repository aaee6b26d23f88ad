"""Benchmark 1's methods, each run to a ``MethodResult``: ours (one process, or workers sharing the GPU),
A (``Trainer.hyperparameter_search``) and B (a fresh process per trial, whose child is ``child_main``).

The project, torch and transformers are imported inside each runner.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, RESULT_PREFIX, log_tail, run_child
from bench.models import value_overrides
from bench.report import num, say
from bench.sweep_results import MethodResult
from bench.timing import finished_timings, from_frozen
from bench.trainer import loop_rows, trainer_arguments, trainer_fixed_arguments

# The space every method samples: rank, targets, optimizer with its own learning rate (cosine is fixed).
SPACE = ["search_space=optimizer", "lora.r=choice(8,16,32)", "lora.targets=choice(qk,all-linear)"]
METHODS = ("ours", "ours-ckpt", "ours-padded", "shared", "trainer", "processes")


# ---------------------------------------------------------------------------------------------------------------
# ours


def run_ours(args: argparse.Namespace, overrides: list[str], workdir: Path, key: str = "ours",
             extra: Sequence[str] = ()) -> MethodResult:
    from sweeper import compose
    from sweeper.launch import run_sweep

    began = time.time()
    cfg, params = compose.load([*overrides, *SPACE, *extra, f"study.n_trials={args.trials}", f"study.name=bench-{key}",
                                f"study.timeout_s={args.method_timeout}", f"output_dir={workdir / key}"])
    study = run_sweep(cfg, params, show_progress=False)
    ended = time.time()
    return MethodResult(key, finished_timings(study), began, ended)


def run_shared(args: argparse.Namespace, overrides: list[str], workdir: Path) -> MethodResult:
    """Ours as ``python -m sweeper launch workers.count=K workers.per_gpu=K``: K workers on the one GPU."""
    from sweeper import compose
    from sweeper.study import load_study

    k = args.shared_workers
    run = [*overrides, *SPACE, f"study.n_trials={args.trials}", "study.name=bench-shared",
           f"study.timeout_s={args.method_timeout}", f"output_dir={workdir / 'shared'}",
           f"study.storage=journal:{workdir / 'shared.journal'}", f"workers.count={k}", f"workers.per_gpu={k}"]
    log = workdir / "shared.log"
    began = time.time()
    with log.open("w") as out:
        code = subprocess.run([sys.executable, "-m", "sweeper", "launch", *run, "--no-progress"], cwd=REPO_ROOT,
                              stdout=out, stderr=subprocess.STDOUT).returncode
    ended = time.time()
    cfg, _ = compose.load(run)
    notes = [] if code == 0 else [f"the launcher exited with {code}; {log}:\n{log_tail(log)}"]
    return MethodResult("shared", finished_timings(load_study(cfg)), began, ended, notes, workers=k)


# ---------------------------------------------------------------------------------------------------------------
# A: Trainer.hyperparameter_search


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_trial_clock(device: Any, measure: Callable[[Any], float]) -> Any:
    """A TrainerCallback timing each trial's training steps and evaluation, and re-measuring the eval loss
    with our token-weighted evaluation (timed too, and removed from the method's time)."""
    from transformers import TrainerCallback

    class TrialClock(TrainerCallback):
        def __init__(self) -> None:
            self.first: float | None = None
            self.last: float | None = None
            self.number = -1
            self.trainer: Any = None  # the callback handler's own model reference is the first, stale one
            self.records: dict[int, dict[str, float]] = {}

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.first = self.last = None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.first is None:
                self.first = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _sync(device)
            self.last = time.perf_counter()

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                        **kw: Any) -> None:
            train_s = (self.last - self.first) if self.first is not None and self.last is not None else 0.0
            start = time.perf_counter()
            loss = measure(self.trainer.model)
            extra = time.perf_counter() - start
            self.records[self.number] = {"busy": train_s + float((metrics or {}).get("eval_runtime", 0.0)),
                                         "extra": extra, "token_loss": loss}

    return TrialClock()


def run_trainer(args: argparse.Namespace, overrides: list[str], workdir: Path) -> MethodResult:
    import optuna
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )

    from objectives.base import TORCH_DTYPES, initialise_lora, linear_module_names, pick_device
    from objectives.data import collate, prepare
    from objectives.sources import weights_path
    from objectives.targets import resolve_targets
    from objectives.training import eval_passes, evaluate
    from sweeper import compose
    from sweeper.config import to_container, to_schema
    from sweeper.samplers import make_sampler
    from sweeper.values import apply_values, sample

    began = time.time()
    cfg, params = compose.load([*overrides, *SPACE])
    path = weights_path(cfg.model)
    device = pick_device(cfg.train.device)
    dtype = TORCH_DTYPES[cfg.model.compute_dtype]
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id
    data = prepare(cfg.data, tokenizer, cfg.model.cache_path)
    # The batches our loop sees, in its order, read sequentially: both methods train on the same data.
    rows = [r for batch in loop_rows(data, cfg.train) for r in batch]
    config = to_container(cfg)

    def trial_config(trial: Any) -> Any:
        return cfg if trial is None else to_schema(apply_values(config, sample(trial, params)))

    def model_init(trial: Any = None) -> Any:
        # Runs before hp_space in each trial: it samples the LoRA values first (asking again gives the same).
        lora = trial_config(trial).lora
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.model.quant_type,
                                   bnb_4bit_use_double_quant=cfg.model.double_quant, bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype,
                                                     device_map={"": str(device)},
                                                     attn_implementation=cfg.model.attn_implementation)
        model.config.use_cache = False
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,  # the recipe's default
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        targets = resolve_targets(lora.targets, linear_module_names(model))
        peft = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.effective_alpha, lora_dropout=lora.dropout,
                                                target_modules=targets, use_rslora=lora.use_rslora, bias="none",
                                                task_type="CAUSAL_LM"))
        # peft draws the initial weights on the CPU, ours on the GPU they live on: the same distribution, other
        # values. Starting both loops from the same weights and random state leaves only the loops to compare.
        initialise_lora(peft, lora, cfg.train.seed)
        return peft

    def hp_space(trial: Any) -> dict[str, Any]:
        clock.number = trial.number
        return trainer_arguments(trial_config(trial))

    held_out = eval_passes(data, cfg.train.micro_batch_size, False, pad_id)  # padded, as A's Trainer evaluates
    clock = make_trial_clock(device, lambda model: evaluate(model, held_out, device))
    fixed = trainer_fixed_arguments(workdir / "trainer", cfg, device, args.trainer_precision == "bf16")
    trainer = Trainer(model_init=model_init, args=TrainingArguments(**fixed, **trainer_arguments(cfg)),
                      train_dataset=rows, eval_dataset=data.eval, data_collator=partial(collate, pad_id=pad_id),
                      callbacks=[clock])
    clock.trainer = trainer
    trainer.remove_callback(PrinterCallback)  # it would print every log dict: the report is the output
    storage = optuna.storages.InMemoryStorage()
    trainer.hyperparameter_search(hp_space=hp_space, n_trials=args.trials, direction="minimize", backend="optuna",
                                  sampler=make_sampler(cfg.study.sampler, params), storage=storage,
                                  study_name="bench-trainer", timeout=args.method_timeout)
    ended = time.time()
    study = optuna.load_study(study_name="bench-trainer", storage=storage)
    trials = []
    for t in study.get_trials(deepcopy=False):
        if t.datetime_complete is None:
            continue
        rec = clock.records.get(t.number, {})
        trials.append(dataclasses.replace(from_frozen(t, excluded=rec.get("extra", 0.0)), busy=rec.get("busy"),
                                          value=rec.get("token_loss", t.value)))
    own = [t.value for t in study.get_trials(deepcopy=False) if t.value is not None]
    notes = [f"A's own objective (Trainer.evaluate: per-batch mean losses averaged over examples): best "
             f"{num(min(own) if own else None, 4)}; the table shows the token-weighted loss that ours and B "
             "report, measured after Trainer.evaluate with our evaluation (its time is taken out of A's)."]
    del trainer
    return MethodResult("trainer", trials, began, ended, notes)


# ---------------------------------------------------------------------------------------------------------------
# B: a fresh process per trial


def run_processes(args: argparse.Namespace, overrides: list[str], workdir: Path) -> MethodResult:
    import optuna

    from sweeper import compose
    from sweeper.records import record
    from sweeper.samplers import make_sampler
    from sweeper.values import sample

    began = time.time()
    cfg, params = compose.load([*overrides, *SPACE])
    study = optuna.create_study(sampler=make_sampler(cfg.study.sampler, params), direction="minimize")
    child = [*overrides, "search_space=none", f"output_dir={workdir / 'processes'}", "study.name=bench-processes"]
    notes = []
    for _ in range(args.process_trials):
        if time.time() - began > args.method_timeout:
            notes.append(f"stopped after {args.method_timeout:.0f} s (--method-timeout)")
            break
        trial = study.ask()
        cmd = [sys.executable, "-m", "bench.sweep_throughput", "child", str(trial.number),
               json.dumps([*child, *value_overrides(sample(trial, params))])]
        log = workdir / f"process-trial-{trial.number}.log"
        code, result = run_child(cmd, log)
        if code != 0 or result is None or result.get("value") is None:
            notes.append(f"trial {trial.number} failed (exit {code}); log {log}:\n{log_tail(log)}")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        record(trial, train_seconds=result["train_seconds"])
        study.tell(trial, result["value"])
    ended = time.time()
    return MethodResult("processes", finished_timings(study), began, ended, notes)


def child_main(number: int, overrides: list[str]) -> int:
    """One trial in this fresh process: compose, load, train, evaluate, log to MLflow, report, exit."""
    import optuna

    from sweeper import compose
    from sweeper.launch import Resources
    from sweeper.objective import QLoRAObjective
    from sweeper.records import TrialRecord
    from sweeper.tracking import make_tracker

    cfg, params = compose.load(overrides)
    resources = Resources.load(cfg)
    objective = QLoRAObjective(cfg, params, resources.base, resources.data, make_tracker(cfg), None, False)
    trial = optuna.trial.FixedTrial({}, number=number)
    value = objective(trial)
    say(RESULT_PREFIX + json.dumps({"value": value, "train_seconds": TrialRecord.of(trial).train_seconds}))
    return 0


RUNNERS: dict[str, Callable[[argparse.Namespace, list[str], Path], MethodResult]] = {
    "ours": run_ours, "shared": run_shared, "trainer": run_trainer, "processes": run_processes,
    "ours-ckpt": partial(run_ours, key="ours-ckpt", extra=["model.gradient_checkpointing=true"]),
    "ours-padded": partial(run_ours, key="ours-padded", extra=["train.packing=false"])}
