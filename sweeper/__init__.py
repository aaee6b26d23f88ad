"""QLoRA hyperparameter sweeps: Hydra search spaces, Optuna trials, MLflow tracking."""
