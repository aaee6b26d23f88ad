"""The resident base: the quantized model loaded once per process, with one trial's adapter attached at a time."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from objectives import attention
from objectives.config import FOUR_BIT, ConfigError, LoraConfig, ModelConfig
from objectives.sources import weights_path
from objectives.targets import resolve_targets

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def linear_module_names(model: Any) -> list[str]:
    """Full names of the linear layers an adapter can wrap (the output head excluded)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if module is out_emb:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt", "Conv1D"):
            names.append(name)
    return names


def free_accelerator_memory(device: torch.device, collect: bool = True) -> None:
    """Return cached accelerator memory to the device; ``collect`` first frees objects held only by
    reference cycles (an exception's traceback holding a failed step's tensors), a full collection that
    costs ~0.2-0.5 s with the libraries a sweep loads."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def use_tf32(on: bool) -> None:
    """TensorFloat-32 for fp32 matrix products on CUDA (``model.tf32``); a no-op for the CPU's products."""
    torch.backends.cuda.matmul.allow_tf32 = on


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def current_device(device: torch.device) -> AbstractContextManager[Any]:
    """``device`` as this thread's current CUDA device (nothing to do off CUDA). Triton's kernels launch on the
    current device, not on their tensors': training on ``cuda:1`` would launch them on ``cuda:0``."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def initialise_lora(model: Any, lora: LoraConfig, seed: int) -> None:
    """(Re)initialise every LoRA slot of a peft model in module order from ``seed``, on the device the
    weights live on: a fresh injection and an in-place reuse start from the same weights and leave the
    random state (dropout's next masks) in the same place."""
    from peft.tuners.lora import LoraLayer

    scaling = lora.effective_alpha / (lora.r ** 0.5 if lora.use_rslora else lora.r)
    peft_cfg = model.peft_config["default"]
    peft_cfg.lora_alpha, peft_cfg.lora_dropout = lora.effective_alpha, lora.dropout
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.reset_lora_parameters("default", True)
            module.scaling["default"] = scaling
            dropout = module.lora_dropout["default"]
            if isinstance(dropout, torch.nn.Dropout):
                dropout.p = lora.dropout


class ResidentBase:
    """The quantized base model and tokenizer, loaded once per process and shared by every trial.

    Example:
        >>> base = ResidentBase(ModelConfig(), torch.device("cpu"))  # doctest: +SKIP
        >>> with base.adapter(LoraConfig(r=8, targets="qk"), seed=0) as model:  # doctest: +SKIP
        ...     model(**batch).loss.backward()
    """

    def __init__(self, cfg: ModelConfig, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        self.cfg = cfg
        self.device = device
        if device.type == "cuda":
            # sdpa prefers cuDNN's attention for bf16 queries on Hopper, and cuDNN builds an execution plan for
            # every new pass shape on the host: packed passes change shape from step to step, and the plan builds
            # took 1.7 s of a 2.5 s Llama-3-8B step (bench/step_profile.py). The memory-efficient and flash
            # kernels need no plan.
            torch.backends.cuda.enable_cudnn_sdp(False)
        use_tf32(cfg.tf32)
        path = weights_path(cfg)
        dtype = TORCH_DTYPES[cfg.compute_dtype]
        quant = None
        if cfg.quant_type in FOUR_BIT:
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                                       bnb_4bit_use_double_quant=cfg.double_quant,
                                       bnb_4bit_compute_dtype=dtype)
        elif cfg.quant_type == "int8":
            quant = BitsAndBytesConfig(load_in_8bit=True)
        common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
        self.tokenizer = AutoTokenizer.from_pretrained(path, **common)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Hub kernels (on by default from transformers 5.25) are code fetched from the hub, and each train() call
        # puts their forward back on every layer they decorate, over the lean layers' fused norms.
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quant, dtype=dtype, device_map={"": str(device)},
            attn_implementation=cfg.attn_implementation, use_kernels=False, **common)
        model.config.use_cache = False
        for module in model.modules():
            # bitsandbytes repacks NF4 weights for a CPU inference kernel on the first no-grad forward
            # (our evaluation) and never unpacks them; that kernel has no backward, so the next
            # training step would get wrong gradients. Keep the trainable layout.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010
        # Loaded with checkpointing when a trial may use it ("auto" decides per trial).
        self.checkpointing = cfg.gradient_checkpointing is not False
        if quant is not None and cfg.upcast_unquantized:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=self.checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            for p in model.parameters():
                p.requires_grad_(False)
            if self.checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
        self.model: Any = model
        self.bf16_attention = False
        self.use_bf16_attention(cfg.bf16_attention)
        self.linear_names = linear_module_names(model)
        self._peft: Any = None
        self._shape: tuple[Any, ...] | None = None
        # Loaded without the copy unless it is asked for: "auto" decides per trial.
        self.base_cache = False
        self.use_base_cache(cfg.base_cache is True)
        self.lean_layers = False
        self.use_lean_layers(cfg.lean_layers)

    @property
    def config(self) -> Any:
        return self._config if self.model is None else self.model.config

    def unload(self) -> None:
        """Let go of the weights, keeping the tokenizer, config and layer names: a slot engine in a process of its
        own (:mod:`objectives.engine_process`) holds its own copy, and two would halve what its slots may use."""
        self._config = self.model.config
        self.release_adapter()
        self.model = None
        free_accelerator_memory(self.device)

    def use_checkpointing(self, on: bool) -> None:
        """Switch gradient checkpointing for the next trial (``model.gradient_checkpointing: auto``)."""
        if on == self.checkpointing:
            return
        # transformers 5.2x renamed these to activation_checkpointing_* and warns at the old names. No
        # catch_warnings here: a slot engine switches per pass, in a thread beside others that warn.
        model = self.model
        if on:
            if hasattr(model, "_require_grads_hook"):  # newer transformers add one per enable
                model.disable_input_require_grads()
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
        self.checkpointing = on

    def use_base_cache(self, on: bool) -> None:
        """Keep or drop the compute-dtype copy of the 4-bit linear weights for the next trial
        (``model.base_cache``, :mod:`objectives.base_cache`); a base that is not 4-bit has none to keep."""
        from objectives.base_cache import cache_base_weights, drop_base_cache

        on = on and self.cfg.quant_type in FOUR_BIT
        if on == self.base_cache:
            return
        if on:
            cache_base_weights(self.model, TORCH_DTYPES[self.cfg.compute_dtype])
        else:
            drop_base_cache(self.model)
            free_accelerator_memory(self.device, collect=False)  # the copies hold no cycles
        self.base_cache = on

    def use_bf16_attention(self, on: bool) -> None:
        """Attention on bf16 copies of an fp32 stream's inputs (``on``, CUDA only) or in the stream's own dtype
        (``model.bf16_attention``, :mod:`objectives.attention`)."""
        cuda_bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        self.bf16_attention = attention.use_bf16_attention(self.model, on and cuda_bf16)

    def use_lean_layers(self, on: bool) -> None:
        """LoRA layers and RMSNorm with fewer operations per call, or peft's and transformers' own
        (``model.lean_layers``, :mod:`objectives.lean_layers`)."""
        from objectives.lean_layers import use_fused_norms, use_lean_layers

        if self.model is not None:  # an unloaded base has no layers to switch
            use_fused_norms(self.model, on)
        if self._peft is not None:
            use_lean_layers(self._peft, on)
        self.lean_layers = on

    def check_packing(self) -> None:
        """Packed examples must not see each other. transformers splits attention at restarted position ids
        for most decoder models under sdpa and eager attention, but a model whose code builds its own mask,
        or flash-attention with more than one row per pass, lets them attend across.

        Compares the second of two packed examples, in a pass of two rows as training makes them, with the
        same example alone, against the same rows with attention across the boundary (an all-ones mask
        turns the split off).

        Raises:
            ConfigError: this model lets packed examples attend to each other.
        """
        n = 4
        ids = (torch.arange(2 * n, device=self.device) * 7 + 100).repeat(2, 1) % self.model.config.vocab_size
        positions = torch.arange(n, device=self.device).repeat(2, 2)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                alone = self.model(input_ids=ids[:, n:]).logits.float()
                packed = self.model(input_ids=ids, position_ids=positions).logits[:, n:].float()
                across = self.model(input_ids=ids, position_ids=positions,
                                    attention_mask=torch.ones_like(ids)).logits[:, n:].float()
        finally:
            self.model.train(was_training)
        mixed = float((packed - alone).abs().max())
        noise = 1e-4 * float(alone.abs().max())
        if mixed > max(noise, 0.5 * float((across - alone).abs().max())):
            raise ConfigError(f"train.packing: {type(self.model).__name__} with attn_implementation="
                              f"{self.cfg.attn_implementation} lets packed examples attend to each other; "
                              "set train.packing=false")

    @contextmanager
    def adapter(self, lora: LoraConfig, seed: int) -> Iterator[Any]:
        """A freshly initialised LoRA adapter for one trial.

        When the adapter's shape (rank, targets, rsLoRA, dropout on/off) is unchanged from the last trial,
        its slots are re-initialised in place instead of being deleted and injected again: peft's
        delete/unload does not return all memory, and in-place reuse allocates nothing. Either way the
        weights are initialised in the same order from the same seed, so a trial's result does not
        depend on which path it took.
        """
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        from objectives.lean_layers import use_lean_layers

        targets = resolve_targets(lora.targets, self.linear_names)
        shape = (lora.r, tuple(targets), lora.use_rslora, lora.dropout > 0)
        if self._peft is not None and self._shape != shape:
            self.release_adapter()
        if self._peft is None:
            peft_cfg = PeftLoraConfig(
                r=lora.r, lora_alpha=lora.effective_alpha,  # type: ignore[arg-type]  # peft scales by any number
                lora_dropout=lora.dropout, target_modules=targets, use_rslora=lora.use_rslora, bias="none",
                task_type="CAUSAL_LM")
            with warnings.catch_warnings():
                # peft reads transformers' deprecated alias once per injection: noise in every trial's output
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                self._peft, self._shape = get_peft_model(self.model, peft_cfg), shape
            use_lean_layers(self._peft, self.lean_layers)
            # peft records the directory the weights were loaded from (a machine-local cache for a GGUF or
            # random-init source); the adapter's config must name the source as configured, which another
            # machine can resolve. save_pretrained keeps a name that is already set.
            self._peft.peft_config["default"].base_model_name_or_path = self.cfg.source
        initialise_lora(self._peft, lora, seed)
        try:
            yield self._peft
        finally:
            # Tensors go by reference counting; a full gc.collect() here costs ~0.1-1 s per trial.
            for p in self._peft.parameters():
                p.grad = None

    def release_adapter(self) -> None:
        """Remove the adapter and restore the bare base."""
        if self._peft is None:
            return
        self.model = self._peft.unload()
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        self._peft, self._shape = None, None
        free_accelerator_memory(self.device, collect=False)  # the adapter holds no cycles: refcounting frees it
