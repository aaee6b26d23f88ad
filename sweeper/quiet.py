"""What the libraries may print: by default one line per finished trial and the sweeper's own progress."""

from __future__ import annotations

import logging
import os
import warnings

QUIET_LOGGERS = {
    "bitsandbytes": logging.ERROR,  # "pip install kernels" advice on every CPU run
    "matplotlib": logging.ERROR,  # "building the font cache" the first time a plot is drawn
    "mlflow": logging.WARNING,
    "alembic": logging.WARNING,  # MLflow's table creation and migrations
    "transformers": logging.ERROR,
    "peft": logging.ERROR,
    "huggingface_hub": logging.ERROR,
}

THIRD_PARTY_NOTES = r"(peft|transformers|bitsandbytes|accelerate|huggingface_hub)(\.|$)"
"""Modules whose UserWarnings are silenced by default (a regular expression, as ``warnings`` takes it)."""


def quiet_third_party() -> None:
    """One line per finished trial and the sweeper's own progress: the libraries' advice and deprecation
    notices concern their API, which the user does not call.

    Environment variables are read when a library is imported (and by the worker processes a launch starts),
    so they are set here, before any of them is; ``setdefault`` leaves a user's own setting alone.
    """
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow configures its logger on import
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights" bars; set-up logs its own line
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Notes to the libraries' callers, e.g. peft's "could not find a config file" on saving an adapter of a
    # GGUF base; the sweeper's own checks raise ConfigError instead.
    warnings.filterwarnings("ignore", category=UserWarning, module=THIRD_PARTY_NOTES)
    import optuna

    # Its "Trial N finished with value ... and parameters {...}" line per trial; launch prints a short one.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
