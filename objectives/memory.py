"""Peak accelerator memory of one trial, predicted from the model's shape and the trial's settings.

Everything here is pure arithmetic on a config: no weights are loaded and nothing runs on a device.
:func:`estimate` returns a :class:`MemoryEstimate` whose ``allocated`` is the prediction of
``torch.cuda.max_memory_allocated`` over a trial (what ``train_adapter`` reports as ``peak_memory_mb``)
and whose ``total`` adds what the device needs beyond the allocator's count.

The model follows the code path this project runs: ``objectives.base.ResidentBase`` (bitsandbytes 4-bit
base, ``peft.prepare_model_for_kbit_training`` unless ``model.upcast_unquantized`` is off, a fresh peft
LoRA adapter per trial),
``objectives.training.train_adapter`` (no autocast, ``zero_grad(set_to_none=True)``), transformers'
Llama modules with ``sdpa`` attention and non-reentrant gradient checkpointing per decoder layer.

Resident memory (alive for the whole trial)
    * Quantized linear layers: NF4/FP4 pack two weights per byte and keep one absmax per block of 64;
      with double quantization that absmax is one byte plus an fp32 per 256 blocks (0.516 byte per
      weight), without it an fp32 (0.5625 byte). int8 keeps one byte per weight plus an fp32 scale
      per output row. ``none`` keeps the compute dtype (bf16: 2 bytes).
    * The layers bitsandbytes does not quantize: token embeddings, the output head (shared with the
      embeddings when tied) and the RMSNorm weights. ``prepare_model_for_kbit_training`` casts every
      non-4-bit bf16/fp16 parameter to fp32, so with a quantized base they take 4 bytes each (1.05 GB
      for Llama-3.2-1B's tied 128256 x 2048 embedding, 4.2 GB for Llama-3-8B's two).
    * The adapter: r * (in + out) parameters per wrapped linear layer, counted exactly from the
      resolved target modules. peft keeps adapter weights in fp32 (``autocast_adapter_dtype``), so
      weights and gradients take 4 bytes each; gradients are counted for the whole trial although
      ``set_to_none`` frees them between steps (a small over-estimate, at most 4 bytes per adapter
      parameter).
    * Optimizer state (created by the first step, alive from then on): AdamW 8 bytes per parameter
      (two fp32 moments); SGD with momentum 4 bytes, without 0.
    * cuBLAS workspaces, which torch allocates through its caching allocator: one per thread that
      runs matrix products (the forward thread and the autograd thread), 32 MiB each on Hopper.
    * With ``model.base_cache`` on, the 4-bit linear weights dequantized once into the compute dtype
      (2 bytes per weight beside the 4-bit ones, :mod:`objectives.base_cache`); the per-call dequantized
      weight among the backward temporaries is then gone.

Activations: tensors saved for backward
    The embedding output and every later tensor are fp32 when the base is quantized and upcast, because
    the fp32 embedding feeds an fp32 residual stream: ``Linear4bit`` casts its input to the compute dtype
    and its output back to the input's dtype, and LoRA layers compute in fp32. With ``quant_type=none``
    or ``upcast_unquantized=false`` they are bf16, except the RMSNorm's fp32 copy of its input.
    Call ``e`` that activation size (4 or 2 bytes). Per token and decoder layer, without checkpointing, autograd keeps:

    * input and post-attention RMSNorm: the fp32 input (``pow`` and ``mul`` share it), ``4h`` each,
      plus one fp32 ``rsqrt`` per token; the normalized output is not kept because the norm weight is
      frozen;
    * attention, by the kernel sdpa picks (:func:`attention_kernel`):

      - a fused kernel (flash or memory-efficient) keeps the rotated query ``e*nh*hd``, key and value
        ``e*nkv*hd`` each, its output ``e*nh*hd`` and an fp32 log-sum-exp per head;
      - with padding in the batch transformers passes a mask, which rules out sdpa's grouped-query
        path: keys and values are repeated to ``nh`` heads (``e*nh*hd`` each) and the memory-efficient
        kernel also keeps the mask as a ``(b, 1, s, s)`` float bias in every layer (``e*s`` per token);
      - on CUDA an fp32 stream with grouped-query heads and no mask runs the math kernel (flash takes
        no fp32, the memory-efficient kernel no grouped-query heads): it keeps the scaled query, the
        repeated keys and values (``e*nh*hd`` each) and the ``(b, nh, s, s)`` probabilities
        (``e*nh*s`` per token: quadratic in the sequence length), and its backward holds three such
        tensors more. This is the default project setup (NF4 base, Llama-style grouped-query heads,
        unpadded rows) and the largest term for long sequences without checkpointing;
    * MLP: ``gate`` output (kept by SiLU), SiLU output and ``up`` output (kept by the product), ``3*e*I``;
    * per wrapped module of input width ``d``: with dropout, the fp32 dropout output ``4d`` (kept by
      ``lora_A``) and its mask (1 byte on CUDA, a 4-byte noise tensor on the CPU); without dropout
      ``lora_A`` keeps its input itself, shared by the modules reading the same tensor (q/k/v, gate/up)
      when it is already fp32; plus the ``lora_A`` output ``4r``;
    * frozen 4-bit layers keep nothing: bitsandbytes' ``MatMul4Bit`` saves only the packed weight, and
      a product with a frozen weight needs no copy of its input.

    The first layer is cheaper: its input (the frozen embedding) needs no gradient, so its first norm
    keeps nothing, and an operation keeps its inputs only once something upstream needs a gradient;
    :func:`layer_saved_bytes` follows that ``requires_grad`` flow. Rotary cos/sin (``e`` bytes) are
    shared by all layers. Counted with ``torch.autograd.graph.saved_tensors_hooks`` on the CPU, this is
    exact to the byte for the tiny model (tests/test_memory.py).

    With gradient checkpointing each decoder layer keeps only its input (``e*h`` per token). The
    backward pass then recomputes one layer at a time, whose full activations (as above, the input
    needing a gradient) and the backward's temporaries live beside the checkpoints and the gradients.

The loss
    The output head produces fp32 logits (``4*V`` bytes per token: large for small models with big
    vocabularies), the loss's ``log_softmax`` output is kept for backward (another ``4*V``), and the
    backward's first two steps allocate the gradient of that output and the gradient of the logits
    (``4*V`` each) while it is alive: ``12*V`` bytes per token at the start of the backward pass, when
    every saved activation is still alive. (With a bf16 head the logits are bf16 plus an fp32 copy;
    the peak is the same.) The allocator's history on an H200 shows exactly these three
    ``(b*s, V)`` fp32 blocks at the peak.

    With ``train.fused_loss`` on (liger-kernel's fused linear cross-entropy) no full logits exist: the
    forward computes the logits of ``c`` tokens at a time (``c`` = the tokens divided by ``ceil(V / h)``,
    rounded up to a power of two) in the hidden state's dtype, turns them into their gradient in place and
    accumulates the gradient of the hidden state (``e*h`` per token, kept for backward) and an fp32 loss per
    token. The loss's share of the peak is then ``t*(e*h + 5) + c*e*(V + h)``: read from liger-kernel's
    code, not yet measured on a GPU.

The peak
    The largest of three moments: the start of the backward pass (resident + activations + the
    loss's ``12*V``), the backward of the last decoder layer (with checkpointing: resident +
    checkpoints + one recomputed layer + its temporaries), and the optimizer step (resident + the
    optimizer's temporaries). Backward temporaries of a layer are the larger of the math attention's
    (above) and the MLP's: three ``e*I`` gradients, one bf16 copy of a gradient, two hidden-size
    gradients and one dequantized bf16 weight (``in*out*2``: bitsandbytes dequantizes the whole matrix
    in forward and backward on Hopper).

Accuracy
    bench/memory_accuracy.py trains 24 configurations on one H200 (SmolLM2-135M, Llama-3.2-1B and
    Llama-3-8B shapes; ranks 4 to 64; qk to all-linear; micro-batches of 1 to 32 rows of 128 to 4096
    tokens; checkpointing on and off; dropout, SGD, padding): ``allocated`` is within -0.9% to +7.3% of
    ``max_memory_allocated``, median absolute error 0.1%. The largest over-predictions are long
    sequences with checkpointing, where the MLP's saved tensors are counted beside the attention's
    backward although the MLP's backward has freed them by then.

Runtime overhead (in ``total``, not in ``allocated``)
    The CUDA context (driver, kernels, cuBLAS and bitsandbytes libraries), which
    ``max_memory_allocated`` does not see, is taken as 768 MiB (757 MiB measured on the H200 with torch
    2.11), and the caching allocator's fragmentation (reserved but unallocated) as 10% of the allocated
    peak (1-15% measured; up to 33% with the math kernel's quadratic blocks). On the CPU both are 0 and
    the prediction is for reference only.

Sequence length is the upper bound ``data.max_length``: a padded batch reaches it when its longest row
does, a packed pass (``train.packing``) when its rows are full.

Example:
    >>> shape = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    ...          "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    ...          "vocab_size": 49152, "tie_word_embeddings": True}
    >>> est = estimate(shape, TrialSettings(r=8, targets="qkvo", micro_batch_size=4, seq_len=256))
    >>> est.adapter_params
    921600
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from objectives.config import FOUR_BIT
from objectives.shape import (
    DTYPE_BYTES,
    MiB,
    ModelShape,
    TrialSettings,
    adapter_modules,
    adapter_tensor_sizes,
    gib,
)

NF4_BLOCK = 64
NESTED_BLOCK = 256
CUBLAS_WORKSPACE_BYTES = 32 * MiB
CUBLAS_THREADS = 2
CUDA_CONTEXT_BYTES = 768 * MiB
ALLOCATOR_SLACK = 0.10

@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak memory of one trial, by component, in bytes.

    ``allocated`` predicts ``torch.cuda.max_memory_allocated``; ``total`` adds the runtime overhead.
    """

    base_weights: int
    """Quantized (or bf16) linear layers, with their quantization constants."""
    unquantized_weights: int
    """Embeddings, output head, norms (fp32 after the kbit upcast)."""
    adapter: int
    gradients: int
    optimizer: int
    workspace: int
    """cuBLAS workspaces and the input batch."""
    activations: int
    """Tensors saved for backward that are alive at the peak."""
    logits: int
    """Logits, log-probabilities and their gradients alive at the peak."""
    transient: int
    """Short-lived buffers at the peak (backward temporaries, dequantized weights, optimizer scratch)."""
    runtime: int
    """CUDA context and allocator fragmentation: not in ``max_memory_allocated``."""
    adapter_params: int = 0
    peak_at: str = ""
    """Which moment of the step is the peak: loss backward, layer backward, or optimizer step."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    base_cache: int = 0
    """The compute-dtype copy of the 4-bit linear weights (``model.base_cache``)."""

    COMPONENTS: ClassVar[tuple[str, ...]] = (
        "base_weights", "base_cache", "unquantized_weights", "adapter", "gradients", "optimizer", "workspace",
        "activations", "logits", "transient", "runtime")

    @property
    def allocated(self) -> int:
        """The prediction of ``torch.cuda.max_memory_allocated`` over the trial."""
        return sum(getattr(self, name) for name in self.COMPONENTS if name != "runtime")

    @property
    def total(self) -> int:
        """Device memory the trial needs: the allocated peak plus the runtime overhead."""
        return self.allocated + self.runtime

    def components(self) -> list[tuple[str, int]]:
        """(name, bytes) of every component, in a fixed order."""
        return [(name, int(getattr(self, name))) for name in self.COMPONENTS]

    def format(self) -> str:
        """A human-readable breakdown, one component per line."""
        width = max(len(n) for n in self.COMPONENTS)
        lines = [f"  {name:<{width}}  {gib(value):>10}" for name, value in self.components()]
        lines.append(f"  {'allocated':<{width}}  {gib(self.allocated):>10}   (torch max_memory_allocated)")
        lines.append(f"  {'total':<{width}}  {gib(self.total):>10}   (peak at {self.peak_at}; "
                     f"{self.adapter_params:,} adapter parameters)")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def captured_shapes(s: TrialSettings) -> int:
    """How many sets of gradients a trial keeps: one, or with CUDA graphs one per pass shape a graph captures (a
    packed pass has 1 to micro_batch_size rows; the graphs keep theirs between steps)."""
    return (s.micro_batch_size if s.packed else 1) if s.cuda_graphs else 1


def optimizer_state_bytes(name: str, tensor_sizes: Sequence[int], momentum: float = 0.9) -> int:
    """Persistent optimizer state for fp32 parameters of these sizes."""
    n = sum(tensor_sizes)
    if name == "adamw":
        return 8 * n
    return 4 * n if momentum > 0 else 0


def optimizer_step_scratch(name: str, n: int) -> int:
    """Temporaries of one optimizer step: foreach AdamW holds one parameter-sized list (sqrt of v)."""
    return 4 * n if name == "adamw" else 0


# --- weights --------------------------------------------------------------------------------------

def quantized_weight_bytes(shape: ModelShape, s: TrialSettings) -> int:
    """The decoder layers' linear weights in their storage type, with quantization constants."""
    total = 0
    for d_in, d_out in shape.linear_shapes().values():
        n = d_in * d_out
        if s.quant_type in FOUR_BIT:
            blocks = math.ceil(n / NF4_BLOCK)
            consts = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) if s.double_quant else 4 * blocks
            total += math.ceil(n / 2) + consts
        elif s.quant_type == "int8":
            total += n + 4 * d_out
        else:
            total += n * DTYPE_BYTES[s.compute_dtype]
    return total * shape.num_layers


def base_cache_bytes(shape: ModelShape, s: TrialSettings) -> int:
    """The compute-dtype copy of the 4-bit linear weights, when ``model.base_cache`` keeps one."""
    return shape.linear_params * DTYPE_BYTES[s.compute_dtype] if s.base_cache else 0


def unquantized_weight_bytes(shape: ModelShape, s: TrialSettings) -> int:
    per = 4 if s.fp32_unquantized else DTYPE_BYTES[s.compute_dtype]
    return shape.unquantized_params * per


# --- activations ----------------------------------------------------------------------------------

def _lora_group_bytes(modules: Sequence[str], wrapped: set[str], d_in: int, in_grad: bool, s: TrialSettings,
                      shared_input_saved: bool) -> int:
    """Per-token bytes the LoRA branches of modules reading one input keep.

    ``shared_input_saved``: the input tensor is already kept by another operation (no extra copy).
    """
    hit = [m for m in modules if m in wrapped]
    if not hit:
        return 0
    out = 4 * s.r * len(hit)
    if s.dropout > 0:
        out += len(hit) * (4 * d_in + (s.mask_bytes * d_in if in_grad else 0))
    elif s.act_bytes != 4:
        out += len(hit) * 4 * d_in  # each module casts its input to fp32 separately
    elif not shared_input_saved:
        out += 4 * d_in  # one fp32 input, kept once by every lora_A that reads it
    return out


def layer_saved_bytes(shape: ModelShape, s: TrialSettings, wrapped: set[str], in_grad: bool) -> tuple[int, bool]:
    """Bytes one decoder layer keeps for backward (no checkpointing), and whether its output needs a grad.

    ``wrapped`` holds the module suffixes with an adapter; ``in_grad`` says whether the layer's input
    needs a gradient (False for the first layer: the embedding is frozen).
    """
    t, e, h, inter = s.tokens, s.act_bytes, shape.hidden_size, shape.intermediate_size
    q_dim, kv_dim = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    per_token = 0
    if in_grad:
        per_token += 4 * h + 4  # input RMSNorm: fp32 input and rsqrt
    per_token += _lora_group_bytes(("q_proj", "k_proj", "v_proj"), wrapped, h, in_grad, s, False)
    qkv_grad = in_grad or bool(wrapped & {"q_proj", "k_proj", "v_proj"})
    extra = 0
    math_kernel = attention_kernel(shape, s) == "math"
    a = s.attention_bytes  # bf16 copies with bf16 attention: o_proj then reads a cast of the kernel's output
    if qkv_grad and math_kernel:
        # scaled query, repeated keys and values, and the (b, heads, s, s) probabilities
        per_token += a * (3 * q_dim + shape.num_heads * s.seq_len)
    elif qkv_grad:
        k_size = q_dim if s.has_mask else kv_dim  # repeat_kv when a mask rules out sdpa's GQA path
        per_token += a * (2 * q_dim + 2 * k_size) + 4 * shape.num_heads
        if s.has_mask:
            extra += s.micro_batch_size * s.seq_len * s.seq_len * a  # the float bias sdpa keeps
    # o_proj reads the attention output, which a fused kernel already keeps (unless o_proj reads its fp32 cast).
    per_token += _lora_group_bytes(("o_proj",), wrapped, q_dim, qkv_grad, s,
                                   qkv_grad and not math_kernel and a == e)
    mid_grad = qkv_grad or "o_proj" in wrapped
    if mid_grad:
        per_token += 4 * h + 4  # post-attention RMSNorm
    per_token += _lora_group_bytes(("gate_proj", "up_proj"), wrapped, h, mid_grad, s, False)
    gate_grad, up_grad = mid_grad or "gate_proj" in wrapped, mid_grad or "up_proj" in wrapped
    if gate_grad:
        per_token += e * inter * 2  # SiLU keeps the gate output; the product keeps the up output
    if up_grad:
        per_token += e * inter  # the product keeps the SiLU output
    prod_grad = gate_grad or up_grad
    per_token += _lora_group_bytes(("down_proj",), wrapped, inter, prod_grad, s, False)
    if s.quant_type == "int8" and (in_grad or wrapped):
        # MatMul8bitLt keeps its input and an int8 transposed copy of it for every linear layer.
        per_token += 4 * h * 2 + 4 * inter + (5 * h + q_dim + inter)
    return t * per_token + extra, prod_grad or "down_proj" in wrapped


def attention_kernel(shape: ModelShape, s: TrialSettings) -> str:
    """Which kind of sdpa kernel runs: ``math`` keeps the (b, heads, s, s) probabilities, ``fused`` does not.

    On CUDA, fp32 inputs rule out the flash kernel and the memory-efficient one takes no grouped-query
    heads, so an fp32 stream with fewer key/value heads than query heads and no mask (nothing to pad)
    falls back to the math kernel. With a mask, keys and values are repeated first and the
    memory-efficient kernel runs; the CPU's flash kernel takes grouped-query heads in fp32.
    """
    gqa = shape.num_kv_heads < shape.num_heads
    return "math" if s.device == "cuda" and s.attention_bytes == 4 and gqa and not s.has_mask else "fused"


def attention_backward_scratch(shape: ModelShape, s: TrialSettings) -> int:
    """The math kernel's backward: gradients of the probabilities and scores beside the kept probabilities."""
    if attention_kernel(shape, s) != "math":
        return 0
    return 3 * s.micro_batch_size * shape.num_heads * s.seq_len * s.seq_len * s.act_bytes


def _wrapped_suffixes(shape: ModelShape, s: TrialSettings, linear_names: Sequence[str] | None) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n in adapter_modules(shape, s.targets, linear_names)}


def activation_bytes(shape: ModelShape, s: TrialSettings, linear_names: Sequence[str] | None = None) -> int:
    """Bytes saved for backward by the whole forward pass without checkpointing, the loss's included."""
    layers, grad = _layers_saved_bytes(shape, s, _wrapped_suffixes(shape, s, linear_names))
    loss = s.tokens * shape.hidden_size * s.act_bytes if s.fused_loss else logprob_bytes(shape, s)
    return layers + _shared_bytes(shape, s) + _head_saved_bytes(shape, s, grad) + loss


def _layers_saved_bytes(shape: ModelShape, s: TrialSettings, wrapped: set[str]) -> tuple[int, bool]:
    total, grad = 0, False
    for _ in range(shape.num_layers):
        layer, grad = layer_saved_bytes(shape, s, wrapped, grad)
        total += layer
    return total, grad


def _shared_bytes(shape: ModelShape, s: TrialSettings) -> int:
    """Rotary cos/sin (one copy for all layers) and the boolean causal mask when there is padding."""
    rotary = 2 * s.seq_len * shape.head_dim * s.act_bytes
    return rotary + (s.micro_batch_size * s.seq_len * s.seq_len if s.has_mask else 0)


def _head_saved_bytes(shape: ModelShape, s: TrialSettings, grad: bool) -> int:
    """Final norm's fp32 input and rsqrt (when the stream needs a gradient) and the shifted labels."""
    return s.tokens * ((4 * shape.hidden_size + 4 if grad else 0) + 8)


def logprob_bytes(shape: ModelShape, s: TrialSettings) -> int:
    """The fp32 log-probabilities ``cross_entropy`` keeps for backward."""
    return s.tokens * shape.vocab_size * 4


def checkpoint_bytes(shape: ModelShape, s: TrialSettings) -> int:
    """With checkpointing: each decoder layer's input, kept for the recomputation."""
    return shape.num_layers * s.tokens * shape.hidden_size * s.act_bytes


def layer_backward_scratch(shape: ModelShape, s: TrialSettings) -> int:
    """Temporaries of one decoder layer's backward: MLP gradients, a bf16 gradient copy, a dequantized weight."""
    t, e, inter, h = s.tokens, s.act_bytes, shape.intermediate_size, shape.hidden_size
    largest = max(i * o for i, o in shape.linear_shapes().values())
    dequant = largest * (2 if s.quant_type in FOUR_BIT else 4 if s.quant_type == "int8" else 0)
    if s.base_cache:
        dequant = 0  # the product reads the kept copy
    return t * (3 * e * inter + 2 * inter + 2 * 4 * h) + dequant


def loss_backward_bytes(shape: ModelShape, s: TrialSettings) -> int:
    """At the start of backward, beside the kept log-probabilities: their gradient and the logits' gradient."""
    return 2 * s.tokens * shape.vocab_size * 4


def fused_loss_chunk(shape: ModelShape, tokens: int) -> int:
    """Tokens whose logits liger-kernel's fused linear cross-entropy holds at once."""
    factor = math.ceil(shape.vocab_size / shape.hidden_size)
    return min(tokens, 1 << max(0, math.ceil(tokens / factor) - 1).bit_length())


def loss_bytes(shape: ModelShape, s: TrialSettings) -> int:
    """The loss's share of the peak at the start of backward: full fp32 logits, their log-probabilities and two
    gradients; or with ``train.fused_loss`` the kept gradient of the hidden state, the per-token losses and
    labels, and one chunk's logits with its product (the module docstring)."""
    if not s.fused_loss:
        return logprob_bytes(shape, s) + loss_backward_bytes(shape, s)
    e, h, chunk = s.act_bytes, shape.hidden_size, fused_loss_chunk(shape, s.tokens)
    return s.tokens * (e * h + 4 + 1) + chunk * e * (shape.vocab_size + h)


# --- the estimate ---------------------------------------------------------------------------------

def estimate(config: Any, settings: TrialSettings, linear_names: Sequence[str] | None = None) -> MemoryEstimate:
    """Predict the peak memory of one trial.

    Args:
        config: the model's config (``PretrainedConfig``, mapping, or :class:`ModelShape`).
        settings: the trial's quantization, adapter, optimizer, batch and checkpointing.
        linear_names: the loaded model's linear module names (``ResidentBase.linear_names``) to resolve
            targets against; derived Llama-style names when None.

    Raises:
        ConfigError: the targets match no module, or the config lacks a needed field.
    """
    shape = ModelShape.from_config(config)
    s = settings
    sizes = adapter_tensor_sizes(shape, s.r, s.targets, linear_names)
    n_adapter = sum(sizes)
    cuda = s.device == "cuda"
    workspace = (CUBLAS_THREADS * CUBLAS_WORKSPACE_BYTES if cuda else 0) + 3 * 8 * s.tokens
    static = dict(base_weights=quantized_weight_bytes(shape, s), base_cache=base_cache_bytes(shape, s),
                  unquantized_weights=unquantized_weight_bytes(shape, s), adapter=4 * n_adapter,
                  gradients=4 * n_adapter * captured_shapes(s),
                  optimizer=optimizer_state_bytes(s.optimizer, sizes, s.momentum),
                  workspace=workspace)
    wrapped = _wrapped_suffixes(shape, s, linear_names)
    shared = _shared_bytes(shape, s)
    loss = loss_bytes(shape, s)
    scratch = max(layer_backward_scratch(shape, s), attention_backward_scratch(shape, s))
    if s.gradient_checkpointing:
        kept = checkpoint_bytes(shape, s) + shared
        last_layer, _ = layer_saved_bytes(shape, s, wrapped, True)
        moments = {"loss backward": (kept + _head_saved_bytes(shape, s, True), loss, 0),
                   "layer backward": (kept + last_layer, 0, scratch)}
    else:
        layers, grad = _layers_saved_bytes(shape, s, wrapped)
        moments = {"loss backward": (layers + shared + _head_saved_bytes(shape, s, grad), loss, 0),
                   "layer backward": (layers + shared, 0, scratch)}
    moments["optimizer step"] = (0, 0, optimizer_step_scratch(s.optimizer, n_adapter))
    peak_at, (activations, logits, transient) = max(moments.items(), key=lambda kv: sum(kv[1]))
    allocated = sum(static.values()) + activations + logits + transient
    runtime = int(CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK * allocated) if cuda else 0
    notes = []
    if s.quant_type == "int8":
        notes.append("int8 activations are approximate (not benchmarked)")
    return MemoryEstimate(**static, activations=activations, logits=logits, transient=transient, runtime=runtime,
                          adapter_params=n_adapter, peak_at=peak_at, notes=tuple(notes))



def estimate_worst(config: Any, settings: TrialSettings, linear_names: Sequence[str] | None = None) -> MemoryEstimate:
    """The larger of :func:`estimate` with and without padding in the batch.

    Real batches are usually padded (a mask: repeated keys and values, a float bias per layer); a batch
    whose rows all reach ``data.max_length``, or a batch of one, is not (on CUDA with an fp32 stream and
    grouped-query heads: the math kernel's quadratic probabilities). Either can happen in one trial.
    """
    with_mask = estimate(config, replace(settings, padded=True), linear_names)
    without = estimate(config, replace(settings, padded=False), linear_names)
    return with_mask if with_mask.allocated >= without.allocated else without
