"""Model shapes as Hydra overrides, how a report names the model, and converting the model into the cache once.

The project (and with it torch) is imported inside ``prepare`` only.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from bench.report import say

# Architectures as overrides of the default model's (SmolLM2-135M) config; "135m" is that config itself.
# head_dim is explicit: the source config keeps its own (64) when hidden_size changes.
SHAPES: dict[str, dict[str, Any]] = {
    "135m": {},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False},
}
SHAPE_NAMES = {"tiny": "tiny random (2 layers)", "135m": "SmolLM2-135M", "1b": "Llama-3.2-1B", "8b": "Llama-3-8B"}


def hydra_value(value: Any) -> str:
    """A Python value as a Hydra override value (quoted when the grammar would misread it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    return text if re.fullmatch(r"[A-Za-z0-9_\-./:]+", text) else "'" + text.replace("'", "\\'") + "'"


def model_overrides(shape: str, source: str | None, random_weights: bool) -> list[str]:
    """Hydra overrides for a model shape: ``tiny`` is ``model=tiny_random``; others reshape the default model."""
    out = ["model=tiny_random"] if shape == "tiny" else []
    if source:
        out.append(f"model.source={hydra_value(source)}")
    if shape != "tiny":
        out.append(f"model.random_init={hydra_value(random_weights)}")
        # one key at a time: Hydra will not replace the whole (empty) mapping from the command line
        out += [f"++model.config_overrides.{k}={hydra_value(v)}" for k, v in SHAPES[shape].items()]
    return out


def value_overrides(values: Mapping[str, Any]) -> list[str]:
    """A trial's sampled ``path -> value`` as plain overrides (which also fix them in the search space)."""
    return [f"{path}={hydra_value(v)}" for path, v in values.items()]


def model_label(cpu_smoke: bool, weights: str) -> str:
    """How a report names its model."""
    return "tiny random model (CPU smoke: numbers mean nothing)" if cpu_smoke else f"SmolLM2-135M ({weights} weights)"


def prepare(shapes: Sequence[str], source: str | None, random_weights: bool) -> None:
    """Convert the model and write random-weight copies (one per shape) once, plus the stdlib data.

    Benchmarks started side by side would otherwise race to create the same cache directories.
    """
    from objectives.data import load_examples
    from objectives.sources import weights_path
    from sweeper import compose

    for shape in shapes:
        start = time.perf_counter()
        cfg, _ = compose.load([*model_overrides(shape, source, random_weights), "search_space=none"])
        path = weights_path(cfg.model)
        say(f"{shape}: {path} ready in {time.perf_counter() - start:.1f}s")
    load_examples(cfg.data, cfg.model.cache_path)
