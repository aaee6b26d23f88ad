"""LoRA target modules: presets and module names resolved against a model's linear layers (no torch needed)."""

from __future__ import annotations

from typing import Any

from objectives.config import ConfigError

# Module-name suffixes per role, across the common decoder families (Llama/Mistral/Qwen, GPT-2, NeoX, Phi).
ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "q": ("q_proj", "query", "c_attn", "query_key_value", "Wqkv", "qkv_proj"),
    "k": ("k_proj", "key", "c_attn", "query_key_value", "Wqkv", "qkv_proj"),
    "v": ("v_proj", "value", "c_attn", "query_key_value", "Wqkv", "qkv_proj"),
    "o": ("o_proj", "attn.c_proj", "attention.dense", "self_attn.dense", "out_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj", "c_fc", "mlp.c_proj", "dense_h_to_4h", "dense_4h_to_h",
            "fc1", "fc2", "gate_up_proj", "w1", "w2", "w3"),
}
PRESETS: dict[str, tuple[str, ...]] = {
    "qk": ("q", "k"),
    "qv": ("q", "v"),
    "qkv": ("q", "k", "v"),
    "qkvo": ("q", "k", "v", "o"),
    "mlp": ("mlp",),
    "all-linear": ("q", "k", "v", "o", "mlp"),
}


def target_names(targets: Any) -> list[str] | str:
    """A preset name stays a name; a comma-separated string or a list becomes a list of module names."""
    if isinstance(targets, str) and targets in PRESETS:
        return targets
    if isinstance(targets, str) and not any(c in targets for c in ",_."):
        raise ConfigError(f"lora.targets: unknown preset {targets!r}; presets: {', '.join(PRESETS)}, "
                          "or module names such as 'q_proj,v_proj'")
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [str(t) for t in targets]
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"lora.targets: empty; use a preset ({', '.join(PRESETS)}) or module names")
    return names


def resolve_targets(targets: Any, linear_names: list[str]) -> list[str]:
    """Preset or names -> the module-name suffixes present in this model.

    Raises:
        ConfigError: when nothing matches, listing the model's linear modules.
    """
    wanted = target_names(targets)
    candidates = [n for role in PRESETS[wanted] for n in ROLE_NAMES[role]] if isinstance(wanted, str) else wanted
    found = [c for c in dict.fromkeys(candidates) if any(n == c or n.endswith("." + c) for n in linear_names)]
    # A preset lists every family's names, of which a model has some; a name the user typed must all exist.
    missing = [] if isinstance(wanted, str) else [c for c in candidates if c not in found]
    if not found or missing:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        what = (f"{', '.join(missing)} {'is not a linear module' if len(missing) == 1 else 'are not linear modules'}"
                if missing else f"{targets!r} matches no linear module")
        raise ConfigError(f"lora.targets: {what} of this model; its linear modules are: {', '.join(kinds)}; "
                          f"presets: {', '.join(PRESETS)}")
    return found
