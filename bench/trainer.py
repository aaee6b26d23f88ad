"""Baseline A's ``Trainer`` set up to train like our loop: the same rows in the same order, the same settings.

torch and transformers are imported inside, where needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def loop_rows(data: Any, train_cfg: Any) -> list[list[dict[str, list[int]]]]:
    """The micro-batches (rows) our training loop feeds in one trial, in its order (same seed, same rows)."""
    from itertools import islice

    from objectives.data import train_micro_batches

    count = train_cfg.max_steps * train_cfg.grad_accum
    return list(islice(train_micro_batches(data.train, train_cfg.micro_batch_size, train_cfg.seed), count))


def trainer_arguments(cfg: Any) -> dict[str, Any]:
    """A trial's optimizer and loop settings as TrainingArguments fields (what ``hp_space`` returns)."""
    o, t = cfg.optimizer, cfg.train
    sgd = o.name == "sgd"
    return {
        "learning_rate": float(o.lr),
        "weight_decay": float(o.weight_decay),
        "optim": "sgd" if sgd else "adamw_torch_fused",  # Trainer's default with torch >= 2.8
        # always a string: hyperparameter_search casts each value to the type of the field's last value
        "optim_args": f"momentum={o.momentum},nesterov={o.nesterov}" if sgd else "",
        "adam_beta1": float(o.betas[0]),
        "adam_beta2": float(o.betas[1]),
        "lr_scheduler_type": {"constant": "constant_with_warmup"}.get(o.scheduler, o.scheduler),
        "warmup_steps": float(o.warmup_ratio),  # a float under 1 is a ratio of the steps
        "max_steps": int(t.max_steps),
        "per_device_train_batch_size": int(t.micro_batch_size),
        "gradient_accumulation_steps": int(t.grad_accum),
        "max_grad_norm": float(t.max_grad_norm),
        "seed": int(t.seed),
    }


def trainer_fixed_arguments(output_dir: Path, cfg: Any, device: Any, bf16: bool) -> dict[str, Any]:
    """TrainingArguments that do not vary per trial: no checkpoints, no reporting, our batches in our order
    (sequential sampler), evaluation only when asked; ``bf16`` adds autocast (CUDA only)."""
    return {"output_dir": str(output_dir), "per_device_eval_batch_size": cfg.train.micro_batch_size,
            "eval_strategy": "no", "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
            "bf16": bf16 and device.type == "cuda", "use_cpu": device.type == "cpu",
            "dataloader_num_workers": 0, "remove_unused_columns": False,
            "train_sampling_strategy": "sequential"}
