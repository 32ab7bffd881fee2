"""Time one jitted QLoRA training step against 16-bit LoRA on the same model and batch; optionally its memory.

    python scripts/bench_train_step.py [--model smollm2|tinyllama-1.1b|llama-7b|tiny] [--out FILE]
    python scripts/bench_train_step.py --variants pallas --memory     # one variant: peak device memory

Variants, measured side by side in one process: ``auto`` (NF4 + double quant, ``quant.kernel``'s
default: on a GPU the fused kernels where XLA would tile, else XLA; XLA elsewhere), ``xla`` (XLA
dequantize + dot), ``pallas`` (the fused kernels; GPU only) and ``bf16`` (16-bit LoRA on a bf16
base). Each compiles once, runs ``--warmup`` steps, then ``--steps`` timed steps; the table
gives the median step time, tokens/s and the throughput relative to the first variant
(16-bit LoRA by default). Layers run as ``train`` runs them: ``lax.scan`` over the
decoder layers, the chosen checkpointing, loss chunk 128. The model is SmolLM2-135M-Instruct
(real weights) on CPU, a random TinyLlama-1.1B-shaped model on GPU, or any preset of
``qlora_jax.memory`` with random weights. Adapters: r=16 (``--rank``) on all linear layers, AdamW.

``--memory`` (one variant per process, since a device's peak counts the whole process):
XLA's analysis of the compiled step (arguments, temporaries, outputs, aliased by
donation), the measured ``memory_stats()["peak_bytes_in_use"]`` after the timed steps
(GPU; the CPU backend does not count), and ``python -m qlora_jax.memory``'s formula for the
same shape (XLA attention, as the model runs it today), each in MiB.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from bench_common import RANDOM_MODELS, Report, fail
from flax import nnx

from qlora_jax import assets
from qlora_jax.config import LoraConfig, QuantConfig
from qlora_jax.loading import load_model, random_model
from qlora_jax.lora import LoRAParam
from qlora_jax.memory import StepShape, for_platform, training_memory
from qlora_jax.train import make_train_step

VARIANTS = {
    "auto": ("QLoRA nf4+dq, auto kernel", QuantConfig("nf4", 64, True, kernel="auto")),
    "xla": ("QLoRA nf4+dq, xla kernel", QuantConfig("nf4", 64, True, kernel="xla")),
    "pallas": ("QLoRA nf4+dq, pallas kernel", QuantConfig("nf4", 64, True, kernel="pallas")),
    "bf16": ("16-bit LoRA (bf16 base)", QuantConfig("none")),
}
LOSS_CHUNK = 128


def build_model(name: str, quant: QuantConfig, lora: LoraConfig, compute_dtype, remat: str):
    if name == "smollm2":
        return load_model(assets.prepared_smollm2(), quant=quant, lora=lora, compute_dtype=compute_dtype,
                          remat=remat)
    return random_model(RANDOM_MODELS[name], quant=quant, lora=lora, compute_dtype=compute_dtype, remat=remat)


def lora_config(rank: int) -> LoraConfig:
    """The adapters timed: all linear layers, alpha = 2 * rank, no dropout."""
    return LoraConfig(rank=rank, alpha=2 * rank, dropout=0.0)


def time_variant(args, quant: QuantConfig, compute_dtype) -> dict:
    model = build_model(args.model, quant, lora_config(args.rank), compute_dtype, args.checkpointing)
    config = model.config
    graphdef, lora_params, frozen = nnx.split(model, LoRAParam, ...)
    del model
    tx = optax.adamw(1e-4)
    opt_state = tx.init(lora_params)
    step = make_train_step(graphdef, tx, donate=jax.default_backend() != "cpu", loss_chunk=LOSS_CHUNK)
    ids = jax.random.randint(jax.random.key(0), (1, args.batch, args.seq_len), 0, config.vocab_size)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}
    key = jax.random.key(1)
    start = time.perf_counter()
    compiled = step.lower(lora_params, opt_state, frozen, batch, key).compile()
    lora_params, opt_state, metrics = compiled(lora_params, opt_state, frozen, batch, key)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    for _ in range(args.warmup):
        lora_params, opt_state, metrics = compiled(lora_params, opt_state, frozen, batch, key)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        lora_params, opt_state, metrics = compiled(lora_params, opt_state, frozen, batch, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    result = {"seconds": seconds, "tokens_per_second": args.batch * args.seq_len / seconds,
              "compile_seconds": compile_seconds, "loss": float(metrics["loss"])}
    if args.memory:
        result["memory"] = _memory(compiled, config, quant, args, compute_dtype)
    return result


def _memory(compiled, config, quant: QuantConfig, args, compute_dtype) -> dict[str, float | None]:
    """MiB: XLA's count for the compiled step, the measured peak (None where the backend keeps no count), formula."""
    analysis = compiled.memory_analysis()
    stats = jax.devices()[0].memory_stats() or {}
    shape = for_platform(StepShape(args.batch, args.seq_len, args.checkpointing, loss_chunk=LOSS_CHUNK,
                                   compute_bytes=jnp.dtype(compute_dtype).itemsize),
                         config, jax.default_backend(), quant.kernel)
    parts = {"arguments": analysis.argument_size_in_bytes, "temporaries": analysis.temp_size_in_bytes,
             "outputs": analysis.output_size_in_bytes, "aliased": analysis.alias_size_in_bytes}
    parts["compiled peak"] = parts["arguments"] + parts["temporaries"] + parts["outputs"] - parts["aliased"]
    parts["measured peak"] = stats.get("peak_bytes_in_use")
    parts["formula"] = training_memory(config, quant, lora_config(args.rank), shape)["total"]
    return {name: None if value is None else value / 2**20 for name, value in parts.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = jax.default_backend() == "gpu"
    parser.add_argument("--model", choices=("smollm2", *RANDOM_MODELS),
                        default="tinyllama-1.1b" if on_gpu else "smollm2")
    parser.add_argument("--variants", default="bf16,auto,xla,pallas" if on_gpu else "bf16,xla",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--batch", type=int, default=8 if on_gpu else 4)
    parser.add_argument("--seq-len", type=int, default=512 if on_gpu else 128)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--checkpointing", choices=("none", "layer", "layer_save_dots"), default="layer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10 if on_gpu else 5)
    parser.add_argument("--memory", action="store_true", help="report compiled, measured and predicted memory")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) to this file, line by line")
    args = parser.parse_args()
    names = [v.strip() for v in args.variants.split(",")]
    if not names or not set(names) <= set(VARIANTS):
        return fail(f"--variants {args.variants!r}: expected a comma-separated list of {', '.join(VARIANTS)}")
    if "pallas" in names and not on_gpu:
        return fail("the pallas variant needs a CUDA GPU (on CPU the kernels only run interpreted, in tests)")
    if args.memory and len(names) != 1:
        return fail("--memory measures one variant per process (a device's peak counts the whole process)")
    compute_dtype = jnp.bfloat16 if on_gpu else jnp.float32
    report = Report(args.out)
    report(f"# One training step, QLoRA vs 16-bit LoRA, on {jax.devices()[0].device_kind}", "",
           f"jax {jax.__version__}; model {args.model}; batch {args.batch} x {args.seq_len} tokens; "
           f"{jnp.dtype(compute_dtype).name} compute; layers scanned, gradient checkpointing {args.checkpointing}, "
           f"loss chunk {LOSS_CHUNK}; LoRA r={args.rank} on all linear layers, AdamW; median of {args.steps} steps "
           f"after {args.warmup} warm-up steps; `python scripts/bench_train_step.py {' '.join(sys.argv[1:])}`", "",
           "| variant | step s | tokens/s | vs " + VARIANTS[names[0]][0] + " | compile s | loss |",
           "|---|---|---|---|---|---|")
    baseline = None
    for name in names:  # each row as soon as it is measured: a run cut short keeps the finished variants
        r = time_variant(args, VARIANTS[name][1], compute_dtype)
        baseline = baseline or r["tokens_per_second"]
        report(f"| {VARIANTS[name][0]} | {r['seconds']:.3f} | {r['tokens_per_second']:.0f} | "
               f"{r['tokens_per_second'] / baseline:.2f}x | {r['compile_seconds']:.0f} | {r['loss']:.4f} |")
        if "memory" in r:
            report("", f"## Memory of one step: {VARIANTS[name][0]} (MiB)", "",
                   "| " + " | ".join(r["memory"]) + " |", "|" + "---|" * len(r["memory"]),
                   "| " + " | ".join("n/a" if v is None else f"{v:.1f}" for v in r["memory"].values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
