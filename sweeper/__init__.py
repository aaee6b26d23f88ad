"""The sweep on top of the recipe: Hydra search spaces, Optuna studies and workers, MLflow tracking, the CLI.

May import ``objectives`` (and Hydra, Optuna, MLflow); nothing in ``objectives`` imports it back."""
