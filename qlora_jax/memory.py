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

import jax
import jax.numpy as jnp
from flax import nnx

from .cli import add_quant_args, quant_config
from .config import CHECKPOINTING, LoraConfig, ModelConfig, OptimConfig, QuantConfig
from .inspect import memory_report
from .loading import read_config
from .lora import LoRAParam
from .model import LlamaForCausalLM, attention_implementation
from .model_source import is_repo_id, resolve_model_dir
from .qmatmul import implementation, tile_rows
from .train import make_train_step

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
    """Sequences per micro-batch, all devices together (``train.batch_size``)."""
    seq_len: int
    checkpointing: str = "layer"
    offload: str = "none"
    loss_chunk: int = 128
    compute_bytes: int = 2
    flash_attention: bool = True
    """cuDNN flash attention: the [B, H, T, T] probabilities are not kept (``model.attention_implementation``
    decides, as the model does)."""
    kernel: str = "xla"
    """The 4-bit products as they run (``qmatmul.resolve_kernel``): ``xla`` decodes each weight to the
    compute dtype before its product, whole or a tile of rows at a time (``decoded_bytes``), and XLA
    decodes a layer's weights as the layer starts, so one layer's decoded weights (or tiles) are alive
    at once (``interpret``, Pallas off a GPU, is counted as ``xla``); ``pallas`` (the fused kernels,
    GPU) decodes in registers; ``gpu`` (``auto`` on a GPU) runs the kernels where ``xla`` would tile and
    decodes the other weights whole."""
    data: int = 1
    """Mesh: data-parallel replicas."""
    fsdp: int = 1
    """Mesh: devices that split the frozen weights."""
    grad_accum: int = 1
    """Micro-batches per step (``train.grad_accum``). With ``layer`` checkpointing the backward pass
    adds each micro-batch's gradients into the running sum in place (``layer_scan``); with the other
    policies the sum is a second gradient-sized buffer beside each micro-batch's gradients."""

    @property
    def devices(self) -> int:
        return self.data * self.fsdp


def for_platform(shape: StepShape, config: ModelConfig, platform: str, kernel: str = "auto") -> StepShape:
    """``shape`` as it runs on ``platform`` (gpu, tpu, cpu) with ``quant.kernel`` = ``kernel``: cuDNN
    attention by the model's rule (``model.attention_implementation``), the 4-bit products as
    ``qmatmul.resolve_kernel`` picks them there."""
    dtype = jnp.float32 if shape.compute_bytes == 4 else jnp.bfloat16
    attention = attention_implementation(platform, dtype, config.head_dim, shape.seq_len, shape.seq_len)
    return dataclasses.replace(shape, flash_attention=attention == "cudnn", kernel=implementation(kernel, platform))


def layer_activation_bytes(config: ModelConfig, lora: LoraConfig | None, shape: StepShape) -> dict[str, int]:
    """Bytes one decoder layer keeps for its backward pass: ``all`` (no checkpointing), ``dots`` (the matmul
    outputs that ``layer_save_dots`` keeps) and ``input`` (the layer input, all ``layer`` keeps)."""
    n, b = shape.batch * shape.seq_len, shape.compute_bytes
    d, f, k = config.hidden_size, config.intermediate_size, config.head_dim
    h, g = config.num_attention_heads, config.num_key_value_heads
    r = lora.rank * len(lora.targets) if lora is not None else 0
    # DoRA: each adapted projection keeps its f32 base and LoRA outputs for the magnitude's gradient, and
    # multiplies the dropped-out input by the base weight once more (one more matmul output)
    outs = sum(config.linear_shapes()[t][0] for t in lora.targets) if lora is not None and lora.dora else 0
    # input, attention norm, q/k/v, attention output, residual, MLP norm, gate, up, silu(gate), product, LoRA
    kept = n * b * (d + d + (h + 2 * g) * k + h * k + d + d + 4 * f + r) + n * (8 + b) * outs
    scores = shape.batch * h * shape.seq_len * (4 if shape.flash_attention else shape.seq_len * (4 + b))
    dots = n * b * ((h + 2 * g) * k + d + 2 * f + d + r + outs)
    return {"all": kept + scores, "dots": dots, "input": n * b * d}


def decoded_bytes(out: int, inp: int, blocksize: int, tokens: int, compute_bytes: int, kernel: str = "xla") -> int:
    """Bytes held decoded for the products of one ``[out, inp]`` 4-bit weight with ``tokens`` rows
    (``StepShape.kernel``): on the XLA path the whole weight in the compute dtype, or where
    ``qmatmul.tile_rows`` tiles it one tile and the backward product's f32 ``[tokens, inp]`` sum;
    nothing where the fused kernels run (``pallas``, and ``gpu`` where ``xla`` would tile)."""
    rows = tile_rows(out, inp, blocksize, tokens, compute_bytes)
    if kernel == "pallas" or (kernel == "gpu" and rows is not None):
        return 0
    if rows is None:
        return out * inp * compute_bytes
    return rows * inp * compute_bytes + tokens * inp * 4


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
    chunk = shape.loss_chunk or shape.seq_len
    logits = 2 * device_batch * min(chunk, shape.seq_len) * config.vocab_size * 4  # f32 logits and their gradient
    # With checkpointing, the loss's logits (forward and backward, before any layer's backward) and the
    # one layer recomputed at a time in the backward pass are never alive together.
    working = max(per_layer["all"], logits)
    if shape.checkpointing == "none":
        saved, host_saved = layers * per_layer["all"] + logits, 0
    elif shape.checkpointing == "layer":
        saved, host_saved = layers * per_layer["input"] + working, 0
    elif shape.checkpointing == "layer_save_dots":
        saved, host_saved = layers * (per_layer["input"] + per_layer["dots"]) + working, 0
    else:  # layer_offload: the dots wait in host memory
        saved, host_saved = layers * per_layer["input"] + working, layers * per_layer["dots"]
    optimizer = 2 * 4 * weights["lora_params"] // shape.devices  # AdamW: mu and nu, f32 (optimizer_state)
    on_host = {"none": 0, "host": optimizer, "host_with_params": optimizer + lora_bytes}[shape.offload]
    base_bytes = (weights["codes_bytes"] if quant.quantized else 0) + weights["constants_bytes"]
    parts = {
        "quantized_weights": (weights["codes_bytes"] if quant.quantized else 0) // shape.fsdp,
        "quant_constants": weights["constants_bytes"] // shape.fsdp,
        "gathered_layer": base_bytes // config.num_hidden_layers if shape.fsdp > 1 else 0,
        "unquantized_frozen": weights["frozen_bytes"] // shape.fsdp,
        "lora_params": lora_bytes if shape.offload != "host_with_params" else 0,
        "lora_grads": lora_bytes,
        "grad_accumulator": lora_bytes if shape.grad_accum > 1 and shape.checkpointing != "layer" else 0,
        "optimizer_state": optimizer if shape.offload == "none" else 0,
        "activations": saved,
        "decoded_layer": 0 if not quant.quantized else sum(
            decoded_bytes(out, inp, quant.blocksize, device_batch * shape.seq_len, shape.compute_bytes, shape.kernel)
            for out, inp in config.linear_shapes().values()),
    }
    # Offloaded state visits the device for the update, after the activations are freed, one decoder
    # layer at a time (``offload.update_by_layer``): the transient is about one layer's adapter matrix,
    # with its two moments, at a time.
    largest_leaf = 4 * lora.rank * max(max(shape_) for shape_ in config.linear_shapes().values())
    transient = max(3 * largest_leaf - parts["activations"], 0) if on_host else 0
    parts["total"] = sum(parts.values()) + transient
    parts["host_optimizer_and_params"] = on_host
    parts["host_activations"] = host_saved
    return parts


def compiled_memory(config: ModelConfig, quant: QuantConfig, lora: LoraConfig, shape: StepShape) -> dict[str, int]:
    """XLA's own count, in bytes, of the step ``train`` runs, compiled from abstract shapes on this backend.

    The same step function (``train.make_train_step``: micro-batch scan, LoRA-only AdamW as
    ``OptimConfig`` builds it, the non-finite guard), the model as ``train`` runs it (stacked
    decoder layers in ``lax.scan``, ``shape.checkpointing``, ``shape.loss_chunk``), buffers donated as
    on an accelerator, and with ``shape.offload`` the optimizer state (and parameters) in
    pinned host memory. Nothing is allocated. ``peak`` is ``arguments + temporaries + outputs
    - aliased`` (what must exist at once, the donated inputs' buffers reused for the outputs);
    ``host_*`` are the parts XLA places in host memory (the CPU backend reports none: all its
    memory is host memory). One device only.
    """
    if shape.devices > 1:
        raise ValueError("--compiled compiles the step for one device; drop --data/--fsdp (the formula above gives "
                         "the per-device parts on a mesh)")
    compute_dtype = jnp.float32 if shape.compute_bytes == 4 else jnp.bfloat16
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, quant=quant, lora=lora, compute_dtype=compute_dtype,
                                                    remat=shape.checkpointing, rngs=nnx.Rngs(0)))
    graphdef, lora_state, frozen = nnx.split(model, LoRAParam, ...)
    tx, _ = OptimConfig(offload=shape.offload).build(100)
    opt_state = jax.eval_shape(tx.init, lora_state)
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")

    def on_host(tree):
        return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=host), tree)

    if shape.offload != "none":
        opt_state = on_host(opt_state)
    if shape.offload == "host_with_params":
        lora_state = on_host(lora_state)
    step = make_train_step(graphdef, tx, donate=True, loss_chunk=shape.loss_chunk, offload=shape.offload)
    ids = jax.ShapeDtypeStruct((shape.grad_accum, shape.batch, shape.seq_len), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": ids, "labels": ids}
    key = jax.eval_shape(lambda: jax.random.key(0))
    stats = step.lower(lora_state, opt_state, frozen, batch, key).compile().memory_analysis()
    fields = {"arguments": "argument", "temporaries": "temp", "outputs": "output", "aliased": "alias"}
    parts = {name: getattr(stats, f"{field}_size_in_bytes") for name, field in fields.items()}
    parts["peak"] = parts["arguments"] + parts["temporaries"] + parts["outputs"] - parts["aliased"]
    parts.update({f"host_{name}": getattr(stats, f"host_{field}_size_in_bytes") for name, field in fields.items()})
    return parts


def format_compiled(parts: dict[str, int], formula: dict[str, int], offload: str = "none") -> str:
    """The compiled counts next to the formula's matching parts (GiB)."""
    held = (formula["quantized_weights"] + formula["quant_constants"] + formula["unquantized_frozen"]
            + formula["lora_params"] + formula["optimizer_state"])
    rows = [("arguments", parts["arguments"], held, "weights, constants, frozen, LoRA params, AdamW state"),
            ("temporaries", parts["temporaries"], formula["lora_grads"] + formula["grad_accumulator"]
             + formula["activations"] + formula["decoded_layer"],
             "LoRA grads (+ accumulator) + activations + one decoded layer or its tiles"),
            ("outputs", parts["outputs"], None, "updated LoRA params and AdamW state, metrics"),
            ("aliased (donated)", parts["aliased"], None, "outputs written into donated inputs"),
            ("peak", parts["peak"], formula["total"], "arguments + temporaries + outputs - aliased")]
    lines = [f"compiled ({jax.default_backend()} backend, buffers donated as on an accelerator; beside it the "
             f"formula for this platform, {100 * (parts['peak'] / formula['total'] - 1):+.1f}% at the peak):"]
    for label, value, predicted, what in rows:
        beside = f"   formula {predicted / GIB:8.2f} GiB" if predicted is not None else " " * 25
        lines.append(f"  {label:<28} {value / GIB:8.2f} GiB{beside}   ({what})")
    host = parts["host_arguments"] + parts["host_temporaries"] + parts["host_outputs"] - parts["host_aliased"]
    if host:
        lines.append(f"  {'host memory':<28} {host / GIB:8.2f} GiB   (offloaded state, not counted in peak)")
    elif offload != "none":
        lines.append(f"  note: the {jax.default_backend()} backend reports no host memory, so the offloaded state "
                     "(and its copy back, which is not donated) is counted above as device memory; compare "
                     "the formula, or compile on a GPU")
    return "\n".join(lines)


def resolve_model(name: str) -> ModelConfig:
    if name in PRESETS:
        return PRESETS[name]
    directory = Path(name).expanduser()
    if not directory.is_dir() and not is_repo_id(name):
        raise FileNotFoundError(f"--model {name!r} is neither a model directory nor a preset ({', '.join(PRESETS)})")
    return read_config(resolve_model_dir(name))[0]


def format_report(name: str, parts: dict[str, int], shape: StepShape, lora: LoraConfig, quant: QuantConfig) -> str:
    mesh = f", mesh data {shape.data} x fsdp {shape.fsdp} (per device)" if shape.devices > 1 else ""
    accum = f" x {shape.grad_accum} micro-batches" if shape.grad_accum > 1 else ""
    lines = [f"{name}: batch {shape.batch} x {shape.seq_len} tokens{accum}{mesh}, {quant.quant_type}"
             f"{'+dq' if quant.double_quant and quant.quantized else ''}, "
             f"{'DoRA' if lora.dora else 'LoRA'} r={lora.rank} ({lora.dtype}) on "
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
    parser.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (train.batch_size)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (train.grad_accum)")
    parser.add_argument("--r", type=int, default=64, help="LoRA rank (all 7 projections)")
    parser.add_argument("--dora", action="store_true", help="DoRA adapters (a magnitude per output feature)")
    parser.add_argument("--lora-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the adapters and their gradients (lora.dtype); AdamW's moments are float32")
    add_quant_args(parser)
    parser.add_argument("--offload", default="none", choices=["none", "host", "host_with_params"])
    parser.add_argument("--checkpointing", default="layer", choices=CHECKPOINTING)
    parser.add_argument("--loss-chunk", type=int, default=128, help="0: logits of the whole sequence at once")
    parser.add_argument("--platform", default="gpu", choices=("gpu", "tpu", "cpu"),
                        help="where the step would run: attention is cuDNN's fused kernel on a GPU (bf16, head_dim "
                             "a multiple of 8 up to 128), XLA elsewhere (model.attention_implementation); 4-bit "
                             "weights are decoded whole or a tile of rows at a time, or inside the fused kernels "
                             "with --kernel pallas on a GPU")
    parser.add_argument("--data", type=int, default=1, help="mesh: data-parallel replicas")
    parser.add_argument("--fsdp", type=int, default=1, help="mesh: devices splitting the frozen weights")
    parser.add_argument("--compiled", action="store_true",
                        help="also compile the real train step from abstract shapes and print XLA's memory analysis")
    args = parser.parse_args(argv)
    try:
        if min(args.seq_len, args.batch, args.grad_accum, args.data, args.fsdp) < 1 or args.loss_chunk < 0:
            raise ValueError("--seq-len, --batch, --grad-accum, --data and --fsdp must be >= 1, --loss-chunk >= 0")
        config = resolve_model(args.model)
        quant = quant_config(args)
        lora = LoraConfig(rank=args.r, dora=args.dora, dtype=args.lora_dtype)
        shape = StepShape(args.batch, args.seq_len, args.checkpointing, args.offload, args.loss_chunk,
                          data=args.data, fsdp=args.fsdp, grad_accum=args.grad_accum)
        formula = training_memory(config, quant, lora, for_platform(shape, config, args.platform, quant.kernel))
        print(format_report(args.model, formula, shape, lora, quant))
        if args.compiled:
            here = for_platform(shape, config, jax.default_backend(), quant.kernel)
            print(format_compiled(compiled_memory(config, quant, lora, here),
                                  training_memory(config, quant, lora, here), args.offload))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
