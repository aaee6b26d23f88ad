"""What memory and time depend on: a decoder's dimensions, one trial's settings, and its adapter's size.

Pure arithmetic on a config: no weights are loaded and nothing runs on a device.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from objectives.config import FOUR_BIT, QUANT_TYPES, ConfigError
from objectives.targets import resolve_targets

if TYPE_CHECKING:
    from objectives.config import RecipeConfig

GiB = 2**30
MiB = 2**20

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
OPTIMIZERS = ("adamw", "sgd")

# Llama-style module suffixes: where each sits under model.layers.N.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder that memory depends on."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers ``PretrainedConfig``, a plain mapping, or a ``ModelShape``.

        Raises:
            ConfigError: a field the model needs is missing.
        """
        if isinstance(config, ModelShape):
            return config

        def get(name: str, default: Any = None) -> Any:
            value = config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)
            return default if value is None else value

        missing = [n for n in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if get(n) is None]
        if missing:
            raise ConfigError(f"model config: missing {', '.join(missing)} (a Llama-style decoder is expected)")
        heads = int(get("num_attention_heads"))
        return cls(
            hidden_size=int(get("hidden_size")),
            intermediate_size=int(get("intermediate_size")),
            num_layers=int(get("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads", heads)),
            head_dim=int(get("head_dim", int(get("hidden_size")) // heads)),
            vocab_size=int(get("vocab_size")),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Module suffix -> (in_features, out_features) of every linear layer in a decoder layer."""
        h, inter = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}

    def linear_names(self) -> list[str]:
        """Full module names as transformers' Llama names them (the output head excluded)."""
        return [f"model.layers.{i}.{'self_attn' if m in ATTENTION_MODULES else 'mlp'}.{m}"
                for i in range(self.num_layers) for m in ATTENTION_MODULES + MLP_MODULES]

    @property
    def linear_params(self) -> int:
        """Weights in the decoder layers' linear modules (what bitsandbytes quantizes)."""
        return self.num_layers * sum(i * o for i, o in self.linear_shapes().values())

    @property
    def unquantized_params(self) -> int:
        """Embeddings, output head (unless tied) and RMSNorm weights: the layers kept in 16/32 bit."""
        embed = self.vocab_size * self.hidden_size
        return embed * (1 if self.tie_word_embeddings else 2) + (2 * self.num_layers + 1) * self.hidden_size

    @property
    def n_params(self) -> int:
        """All weights of the base model."""
        return self.linear_params + self.unquantized_params


@dataclass(frozen=True)
class TrialSettings:
    """What one trial chooses that changes its memory."""

    quant_type: str = "nf4"
    """nf4, fp4, int8 or none."""
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    r: int = 8
    targets: Any = "qkvo"
    """Preset name, comma-separated module names, or a tuple of names."""
    dropout: float = 0.05
    optimizer: str = "adamw"
    """adamw, adamw_8bit, paged_adamw_8bit or sgd."""
    momentum: float = 0.9
    """SGD momentum: a buffer per parameter when > 0."""
    micro_batch_size: int = 4
    seq_len: int = 256
    gradient_checkpointing: bool = True
    upcast: bool = True
    """model.upcast_unquantized: a quantized base's embeddings, head and norms are fp32."""
    packed: bool = False
    """train.packing: rows of several examples, kept apart by a block-diagonal mask even in a batch of one."""
    padded: bool = True
    """Whether batches may hold padding (then sdpa gets a mask). A batch of one never does."""
    device: str = "cuda"
    """cuda or cpu: the CPU saves dropout masks as fp32 and has no CUDA context or cuBLAS workspace."""
    base_cache: bool = False
    """model.base_cache: a compute-dtype copy of the 4-bit linear weights is kept."""
    fused_loss: bool = False
    """train.fused_loss: the loss comes from the hidden state in chunks, without full logits."""
    cuda_graphs: bool = False
    """train.cuda_graphs: each captured pass shape (a row count, with packing) keeps gradients of its own."""
    bf16_attention: bool = False
    """model.bf16_attention: on CUDA, an fp32 stream's attention runs on bf16 copies of its inputs."""

    def __post_init__(self) -> None:
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer: {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError(f"model.quant_type: {self.quant_type!r} is not one of {', '.join(QUANT_TYPES)}")

    @classmethod
    def from_config(cls, cfg: RecipeConfig, *, padded: bool = True, device: str = "cuda") -> TrialSettings:
        """The settings of a (trial's) resolved config.

        The sequence length is ``data.max_length``, an upper bound on a padded batch's longest row and on a
        packed pass's rows.
        ``padded`` says whether batches hold padding (see :func:`estimate_worst` for both cases).
        """
        return cls(quant_type=cfg.model.quant_type, double_quant=cfg.model.double_quant,
                   compute_dtype=cfg.model.compute_dtype, r=cfg.lora.r, targets=cfg.lora.targets,
                   dropout=cfg.lora.dropout, optimizer=cfg.optimizer.name, momentum=cfg.optimizer.momentum,
                   micro_batch_size=cfg.train.micro_batch_size, seq_len=cfg.data.max_length,
                   # "auto" before a trial decides (objectives.decisions.resolve_checkpointing) counts as on
                   gradient_checkpointing=cfg.model.gradient_checkpointing is not False,
                   upcast=cfg.model.upcast_unquantized, packed=cfg.train.packing, padded=padded, device=device,
                   # "auto" before a trial decides counts as off: the plain path's memory, the larger
                   base_cache=cfg.model.base_cache is True and cfg.model.quant_type in FOUR_BIT,
                   fused_loss=cfg.train.fused_loss is True, cuda_graphs=cfg.train.cuda_graphs is True,
                   bf16_attention=cfg.model.bf16_attention and cfg.model.attn_implementation == "sdpa")

    @property
    def quantized(self) -> bool:
        return self.quant_type != "none"

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_len

    @property
    def fp32_unquantized(self) -> bool:
        """Whether the k-bit preparation cast embeddings, head and norms (and so the activations) to fp32."""
        return self.quantized and self.upcast

    @property
    def act_bytes(self) -> int:
        """Bytes per activation value: fp32 after the kbit upcast, else the compute dtype."""
        return 4 if self.fp32_unquantized else DTYPE_BYTES[self.compute_dtype]

    @property
    def attention_bytes(self) -> int:
        """Bytes per value of sdpa's inputs and output: bf16 copies of an fp32 stream's with bf16 attention."""
        return 2 if self.bf16_attention and self.device == "cuda" and self.act_bytes == 4 else self.act_bytes

    @property
    def has_mask(self) -> bool:
        """Whether sdpa gets a mask: padding in a batch of more than one, or packed rows. Packed rows that go
        through the variable-length kernel have none (:mod:`objectives.attention`), but whether they do depends on
        the model and the GPU, which settings do not know: counting the mask errs on the safe side. A slot
        engine's pass that does take the route is estimated without padding
        (:func:`objectives.decisions.slots_memory_bytes`)."""
        return self.padded and (self.micro_batch_size > 1 or self.packed)

    @property
    def mask_bytes(self) -> int:
        return 1 if self.device == "cuda" else 4


def gib(n: float) -> str:
    """Bytes as GiB with two decimals (MiB below one GiB)."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


# --- the adapter ------------------------------------------------------------------------------------

def adapter_modules(shape: ModelShape, targets: Any, linear_names: Sequence[str] | None = None) -> list[str]:
    """Full names of the linear modules LoRA wraps, matched the way peft matches ``target_modules``.

    Raises:
        ConfigError: the targets match nothing in this model.
    """
    key = tuple(targets) if isinstance(targets, list) else targets
    return list(_adapter_modules(shape, key, None if linear_names is None else tuple(linear_names)))


# Planning sizes every slot count and corner of a space: hundreds of estimates of the same few adapters.
@functools.lru_cache(maxsize=256)
def _adapter_modules(shape: ModelShape, targets: Any, linear_names: tuple[str, ...] | None) -> tuple[str, ...]:
    names = list(linear_names) if linear_names is not None else shape.linear_names()
    suffixes = resolve_targets(",".join(targets) if isinstance(targets, tuple) else targets, names)
    return tuple(n for n in names if any(n == s or n.endswith("." + s) for s in suffixes))


def _module_dims(shape: ModelShape, name: str) -> tuple[int, int]:
    suffix = name.rsplit(".", 1)[-1]
    dims = shape.linear_shapes().get(suffix)
    if dims is None:
        raise ConfigError(f"lora.targets: cannot size module {name!r}: only Llama-style "
                          f"{', '.join(shape.linear_shapes())} are known")
    return dims


def adapter_tensor_sizes(shape: ModelShape, r: int, targets: Any,
                         linear_names: Sequence[str] | None = None) -> list[int]:
    """Element counts of every adapter tensor: ``lora_A`` (r x in) and ``lora_B`` (out x r) per module."""
    sizes = []
    for name in adapter_modules(shape, targets, linear_names):
        d_in, d_out = _module_dims(shape, name)
        sizes += [r * d_in, d_out * r]
    return sizes


def adapter_param_count(config: Any, r: int, targets: Any, linear_names: Sequence[str] | None = None) -> int:
    """Trainable parameters of a LoRA adapter (``bias='none'``): r * (in + out) per wrapped module."""
    return sum(adapter_tensor_sizes(ModelShape.from_config(config), r, targets, linear_names))


