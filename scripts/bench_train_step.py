"""Time one jitted QLoRA training step against 16-bit LoRA on the same model and batch.

    python scripts/bench_train_step.py [--out benchmarks/results/bench_train_step_cpu.md]

Variants, measured side by side in one process: quant=nf4 + double quant with the
XLA kernel (dequantize + dot), with the Pallas kernels (GPU only), and quant=none
(bf16 base, 16-bit LoRA). Each variant compiles once, runs ``--warmup`` steps, then
``--steps`` timed steps; the table gives the median step time, tokens/s and the
throughput relative to 16-bit LoRA. The model is SmolLM2-135M-Instruct (real
weights) on CPU, and a random LLaMA-shaped 1.1B model (TinyLlama's shape) on GPU, or
whichever ``--model`` names. Adapters: r=16 on all linear layers, AdamW.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qlora_jax import assets
from qlora_jax.config import LoraConfig, ModelConfig, QuantConfig
from qlora_jax.loading import load_model, random_model
from qlora_jax.lora import LoRAParam
from qlora_jax.train import make_train_step

TINYLLAMA_1B = ModelConfig(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, head_dim=64,
                           rms_norm_eps=1e-5)


def build_model(name: str, quant: QuantConfig, lora: LoraConfig, compute_dtype):
    if name == "smollm2":
        return load_model(assets.prepared_smollm2(), quant=quant.quant_type, blocksize=quant.blocksize,
                          double_quant=quant.double_quant, kernel=quant.kernel, lora=lora,
                          compute_dtype=compute_dtype)
    return random_model(TINYLLAMA_1B, quant=quant, lora=lora, compute_dtype=compute_dtype)


def time_variant(args, quant: QuantConfig, compute_dtype) -> dict:
    lora = LoraConfig(rank=16, alpha=32, dropout=0.0)
    model = build_model(args.model, quant, lora, compute_dtype)
    model.remat = args.checkpointing
    graphdef, lora_params, frozen = nnx.split(model, LoRAParam, ...)
    vocab = model.config.vocab_size
    del model
    tx = optax.adamw(1e-4)
    opt_state = tx.init(lora_params)
    step = make_train_step(graphdef, tx, donate=jax.default_backend() != "cpu")
    ids = jax.random.randint(jax.random.key(0), (1, args.batch, args.seq_len), 0, vocab)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}
    key = jax.random.key(1)
    start = time.perf_counter()
    lora_params, opt_state, metrics = step(lora_params, opt_state, frozen, batch, key)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    for _ in range(args.warmup):
        lora_params, opt_state, metrics = step(lora_params, opt_state, frozen, batch, key)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        lora_params, opt_state, metrics = step(lora_params, opt_state, frozen, batch, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"seconds": seconds, "tokens_per_second": args.batch * args.seq_len / seconds,
            "compile_seconds": compile_seconds, "loss": float(metrics["loss"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = jax.default_backend() == "gpu"
    parser.add_argument("--model", choices=("smollm2", "tinyllama-1b-random"),
                        default="tinyllama-1b-random" if on_gpu else "smollm2")
    parser.add_argument("--batch", type=int, default=8 if on_gpu else 4)
    parser.add_argument("--seq-len", type=int, default=512 if on_gpu else 128)
    parser.add_argument("--checkpointing", choices=("none", "layer", "layer_save_dots"), default="layer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10 if on_gpu else 5)
    parser.add_argument("--out", type=Path, help="also write the table (markdown) to this file")
    args = parser.parse_args()
    compute_dtype = jnp.bfloat16 if on_gpu else jnp.float32
    variants = {"QLoRA nf4+dq, xla kernel": QuantConfig("nf4", 64, True, kernel="xla")}
    if on_gpu:
        variants["QLoRA nf4+dq, pallas kernel"] = QuantConfig("nf4", 64, True, kernel="pallas")
    variants["16-bit LoRA (bf16 base)"] = QuantConfig("none")
    results = {}
    for name, quant in variants.items():
        results[name] = time_variant(args, quant, compute_dtype)
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    baseline = results["16-bit LoRA (bf16 base)"]["tokens_per_second"]
    device = jax.devices()[0].device_kind
    lines = [f"# One training step, QLoRA vs 16-bit LoRA, on {device}", "",
             f"jax {jax.__version__}; model {args.model}; batch {args.batch} x {args.seq_len} tokens; "
             f"{jnp.dtype(compute_dtype).name} compute; gradient checkpointing {args.checkpointing}; LoRA r=16 on "
             f"all linear layers; median of {args.steps} steps after {args.warmup} warm-up steps", "",
             "| variant | step s | tokens/s | vs 16-bit LoRA | compile s | loss |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['seconds']:.3f} | {r['tokens_per_second']:.0f} | "
                     f"{r['tokens_per_second'] / baseline:.2f}x | {r['compile_seconds']:.0f} | {r['loss']:.4f} |")
    lines += ["", f"`python scripts/bench_train_step.py{' --out ' + str(args.out) if args.out else ''}`"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
