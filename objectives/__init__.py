"""The QLoRA recipe: config, model sources, the resident 4-bit base, data, memory and time models, the training run.

Imports nothing from ``sweeper``, ``optuna`` or ``mlflow``; a caller drives a run through ``objective.RunHooks``."""
