"""``python -m qlora_jax.memory --model DIR_OR_PRESET --seq-len L --batch B``: will this fine-tune fit?

Prints the device (and host) memory of one QLoRA training step, part by part, per device
of a ``--data x --fsdp`` mesh (placement: ``qlora_jax.parallel``). Weights,
quantization constants, LoRA parameters, their gradients and AdamW's state are exact:
they come from the abstract model (``nnx.eval_shape``; presets need no weights) and
equal the bytes of the instantiated model. Activations are an estimate from the
shapes (what the backward pass keeps per layer, written out in ``layer_activation_bytes``).
"""

import argparse
import dataclasses
import sys
from pathlib import Path

from .config import CHECKPOINTING, LoraConfig, ModelConfig, QuantConfig
from .inspect import memory_report
from .loading import read_config

GIB = 1024 ** 3

PRESETS = {  # the Hugging Face configs of the original checkpoints
    "llama-7b": ModelConfig("llama", 32000, 4096, 11008, 32, 32, 32, 128),
    "llama-13b": ModelConfig("llama", 32000, 5120, 13824, 40, 40, 40, 128),
    "llama-33b": ModelConfig("llama", 32000, 6656, 17920, 60, 52, 52, 128),
    "llama-65b": ModelConfig("llama", 32000, 8192, 22016, 80, 64, 64, 128),
    "llama3-8b": ModelConfig("llama", 128256, 4096, 14336, 32, 32, 8, 128),
    "llama3-70b": ModelConfig("llama", 128256, 8192, 28672, 80, 64, 8, 128),
    "tinyllama-1.1b": ModelConfig("llama", 32000, 2048, 5632, 22, 32, 4, 64, rms_norm_eps=1e-5),
}


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What one training step processes, and how."""

    batch: int
    """Sequences per step, all devices together (``train.batch_size``)."""
    seq_len: int
    checkpointing: str = "layer"
    offload: str = "none"
    loss_chunk: int = 128
    compute_bytes: int = 2
    flash_attention: bool = True
    """cuDNN flash attention (GPU, bf16): the [B, H, T, T] probabilities are not kept."""
    data: int = 1
    """Mesh: data-parallel replicas."""
    fsdp: int = 1
    """Mesh: devices that split the frozen weights."""

    @property
    def devices(self) -> int:
        return self.data * self.fsdp


def layer_activation_bytes(config: ModelConfig, lora: LoraConfig | None, shape: StepShape) -> dict[str, int]:
    """Bytes one decoder layer keeps for its backward pass: ``all`` (no checkpointing), ``dots`` (the matmul
    outputs that ``layer_save_dots`` keeps) and ``input`` (the layer input, all ``layer`` keeps)."""
    n, b = shape.batch * shape.seq_len, shape.compute_bytes
    d, f, k = config.hidden_size, config.intermediate_size, config.head_dim
    h, g = config.num_attention_heads, config.num_key_value_heads
    r = lora.rank * len(lora.targets) if lora is not None else 0
    # input, attention norm, q/k/v, attention output, residual, MLP norm, gate, up, silu(gate), product, LoRA
    kept = n * b * (d + d + (h + 2 * g) * k + h * k + d + d + 4 * f + r)
    scores = shape.batch * h * shape.seq_len * (4 if shape.flash_attention else shape.seq_len * (4 + b))
    dots = n * b * ((h + 2 * g) * k + d + 2 * f + d + r)
    return {"all": kept + scores, "dots": dots, "input": n * b * d}


def training_memory(config: ModelConfig, quant: QuantConfig, lora: LoraConfig, shape: StepShape) -> dict[str, int]:
    """Bytes of each part of a training step on one device, and what ``offload`` keeps on the host for it.

    On a mesh: frozen weights and constants are split over fsdp (the nested absmax, 1/2048 of
    the codes, and the norms are counted as split too), one layer's 4-bit weights are whole
    while the layer runs, LoRA parameters and gradients are replicated, AdamW's moments are
    split over all devices, and each device holds ``batch / devices`` sequences.
    """
    if shape.batch % shape.devices:
        raise ValueError(f"batch={shape.batch} must be a multiple of data x fsdp = {shape.devices}")
    weights = memory_report(config, quant, lora)
    lora_bytes = weights["lora_bytes"]
    device_batch = shape.batch // shape.devices
    per_layer = layer_activation_bytes(config, lora, dataclasses.replace(shape, batch=device_batch))
    layers = config.num_hidden_layers
    if shape.checkpointing == "none":
        saved, host_saved = layers * per_layer["all"], 0
    elif shape.checkpointing == "layer":
        saved, host_saved = layers * per_layer["input"] + per_layer["all"], 0
    elif shape.checkpointing == "layer_save_dots":
        saved, host_saved = layers * (per_layer["input"] + per_layer["dots"]) + per_layer["all"], 0
    else:  # layer_offload: the dots wait in host memory
        saved, host_saved = layers * per_layer["input"] + per_layer["all"], layers * per_layer["dots"]
    chunk = shape.loss_chunk or shape.seq_len
    logits = 2 * device_batch * min(chunk, shape.seq_len) * config.vocab_size * 4  # f32 logits and their gradient
    optimizer = 2 * lora_bytes // shape.devices  # AdamW: mu and nu, f32
    on_host = {"none": 0, "host": optimizer, "host_with_params": optimizer + lora_bytes}[shape.offload]
    base_bytes = (weights["codes_bytes"] if quant.quantized else 0) + weights["constants_bytes"]
    parts = {
        "quantized_weights": (weights["codes_bytes"] if quant.quantized else 0) // shape.fsdp,
        "quant_constants": weights["constants_bytes"] // shape.fsdp,
        "gathered_layer": base_bytes // config.num_hidden_layers if shape.fsdp > 1 else 0,
        "unquantized_frozen": weights["frozen_bytes"] // shape.fsdp,
        "lora_params": lora_bytes if shape.offload != "host_with_params" else 0,
        "lora_grads": lora_bytes,
        "optimizer_state": optimizer if shape.offload == "none" else 0,
        "activations": saved + logits,
    }
    # Offloaded state visits the device for the update, after the activations are freed; XLA moves it
    # leaf by leaf (each adapter matrix with its two moments), so the transient is one leaf's worth.
    largest_leaf = 4 * lora.rank * max(max(shape_) for shape_ in config.linear_shapes().values())
    transient = max(3 * largest_leaf - parts["activations"], 0) if on_host else 0
    parts["total"] = sum(parts.values()) + transient
    parts["host_optimizer_and_params"] = on_host
    parts["host_activations"] = host_saved
    return parts


def resolve_model(name: str) -> ModelConfig:
    if name in PRESETS:
        return PRESETS[name]
    directory = Path(name).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"--model {name!r} is neither a model directory nor a preset ({', '.join(PRESETS)})")
    return read_config(directory)[0]


def format_report(name: str, parts: dict[str, int], shape: StepShape, lora: LoraConfig, quant: QuantConfig) -> str:
    mesh = f", mesh data {shape.data} x fsdp {shape.fsdp} (per device)" if shape.devices > 1 else ""
    lines = [f"{name}: batch {shape.batch} x {shape.seq_len} tokens{mesh}, {quant.quant_type}"
             f"{'+dq' if quant.double_quant and quant.quantized else ''}, LoRA r={lora.rank} on "
             f"{len(lora.targets)} projections, checkpointing {shape.checkpointing}, optimizer offload "
             f"{shape.offload}, loss chunk {shape.loss_chunk or 'none'}"]
    for key, value in parts.items():
        label = key.replace("_", " ")
        lines.append(f"  {label:<28} {value / GIB:8.2f} GiB{'  (estimate)' if key == 'activations' else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_jax.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help=f"model directory or preset: {', '.join(PRESETS)}")
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--r", type=int, default=64, help="LoRA rank (all 7 projections)")
    parser.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "int4", "none"])
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--offload", default="none", choices=["none", "host", "host_with_params"])
    parser.add_argument("--checkpointing", default="layer", choices=CHECKPOINTING)
    parser.add_argument("--loss-chunk", type=int, default=128, help="0: logits of the whole sequence at once")
    parser.add_argument("--no-flash", action="store_true", help="XLA attention (keeps [B, H, T, T] probabilities)")
    parser.add_argument("--data", type=int, default=1, help="mesh: data-parallel replicas")
    parser.add_argument("--fsdp", type=int, default=1, help="mesh: devices splitting the frozen weights")
    args = parser.parse_args(argv)
    try:
        if min(args.seq_len, args.batch, args.data, args.fsdp) < 1 or args.loss_chunk < 0:
            raise ValueError("--seq-len, --batch, --data and --fsdp must be >= 1, --loss-chunk >= 0")
        config = resolve_model(args.model)
        quant = QuantConfig(args.quant, 64, not args.no_double_quant)
        lora = LoraConfig(rank=args.r)
        shape = StepShape(args.batch, args.seq_len, args.checkpointing, args.offload, args.loss_chunk,
                          flash_attention=not args.no_flash, data=args.data, fsdp=args.fsdp)
        print(format_report(args.model, training_memory(config, quant, lora, shape), shape, lora, quant))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
