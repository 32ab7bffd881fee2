"""Print the README's memory table: device memory of a QLoRA step for LLaMA 7B-65B, formula and compiled.

    python scripts/memory_table.py [--out benchmarks/results/memory_table.md]

Sequence length 512, batch 1, LoRA r=64 on all linear layers (f32 adapters, and bf16 ones as the
paper trains them, both with f32 AdamW moments), NF4 + double quant,
per-layer gradient checkpointing, chunked loss, with the optimizer state on the device
or offloaded to host memory (``qlora_jax.memory``; activations are an estimate), and beside
it XLA's count for the real train step compiled from abstract shapes on this backend
(``qlora_jax.memory.compiled_memory``: arguments + temporaries + outputs - donated), next to
the formula for this backend (on a CPU: XLA attention, and the XLA path's decoded weights of one
layer). A second table: LLaMA-65B per device on meshes of 8 devices, one sequence per device
(formula only).
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import jax

from qlora_jax.config import LoraConfig, QuantConfig
from qlora_jax.memory import GIB, PRESETS, StepShape, compiled_memory, for_platform, training_memory

ADAPTERS = {"float32": "f32 (PEFT's default)", "bfloat16": "bf16 (`lora.dtype: bfloat16`, the paper's)"}
PAPER = {  # QLoRA paper (Dettmers et al., 2023): the 4-bit base's size, and what fits
    "llama-7b": "4-bit base ~5 GB (Fig. 6)",
    "llama-13b": "",
    "llama-33b": "",
    "llama-65b": "< 48 GB total (abstract)",
}


def table() -> str:
    quant, backend = QuantConfig("nf4", 64, True), jax.default_backend()
    lines = ["| model | adapters | 4-bit base + constants | bf16 embeddings/norms/head | LoRA params / grads | "
             "AdamW state | activations (est.) | device total (formula, GPU) | "
             f"formula, {backend.upper()} | **compiled peak** (XLA, {backend.upper()}) | "
             "with `optimizer.offload: host` (formula, GPU) | paper |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = [(name, name, StepShape(batch=1, seq_len=512), dtype, note if dtype == "float32" else "")
            for name, note in PAPER.items() for dtype in ("float32", "bfloat16")]
    rows.append(("llama-65b", "llama-65b, 16 x 528 tokens (`guanaco-65b.yaml`)",
                 StepShape(batch=1, seq_len=528, grad_accum=16), "bfloat16", "the paper's Guanaco-65B run"))
    for name, label, shape, dtype, note in rows:
        config, lora = PRESETS[name], LoraConfig(rank=64, dtype=dtype)
        plain = training_memory(config, quant, lora, for_platform(shape, config, "gpu"))
        offloaded = training_memory(config, quant, lora, for_platform(dataclasses.replace(shape, offload="host"),
                                                                      config, "gpu"))
        here = for_platform(shape, config, backend)
        compiled = compiled_memory(config, quant, lora, here)
        formula_here = training_memory(config, quant, lora, here)
        base = plain["quantized_weights"] + plain["quant_constants"]
        print(f"{label}, {dtype} adapters: compiled peak {compiled['peak'] / GIB:.2f} GiB", file=sys.stderr,
              flush=True)
        grads = plain["lora_grads"] + plain["grad_accumulator"]
        lines.append(f"| {label} | {ADAPTERS[dtype]} | {base / GIB:.2f} GiB | "
                     f"{plain['unquantized_frozen'] / GIB:.2f} GiB | "
                     f"{plain['lora_params'] / GIB:.2f} / {grads / GIB:.2f} GiB | "
                     f"{plain['optimizer_state'] / GIB:.2f} GiB | {plain['activations'] / GIB:.2f} GiB | "
                     f"{plain['total'] / GIB:.1f} GiB | {formula_here['total'] / GIB:.1f} GiB | "
                     f"**{compiled['peak'] / GIB:.1f} GiB** | {offloaded['total'] / GIB:.1f} GiB "
                     f"(+{offloaded['host_optimizer_and_params'] / GIB:.1f} GiB host) | {note} |")
    command = ("`python scripts/memory_table.py` (seq 512, batch 1 unless stated, r=64, NF4+DQ, layer checkpointing, "
               "loss chunk 128, bf16 compute, AdamW moments f32; 16 micro-batches add into one gradient buffer in "
               "place)")
    return "\n".join(lines) + "\n\n" + command + "\n"


def mesh_table() -> str:
    lora, quant = LoraConfig(rank=64, dtype="bfloat16"), QuantConfig("nf4", 64, True)
    lines = ["| llama-65b, mesh (data x fsdp) | batch | 4-bit base + constants | whole layer while it runs | "
             "bf16 embeddings/norms/head | LoRA params + grads | AdamW state | activations (est.) | per device |",
             "|---|---|---|---|---|---|---|---|---|"]
    for data, fsdp in ((1, 1), (8, 1), (2, 4), (1, 8)):
        config = PRESETS["llama-65b"]
        shape = for_platform(StepShape(batch=data * fsdp, seq_len=512, data=data, fsdp=fsdp), config, "gpu")
        parts = training_memory(config, quant, lora, shape)
        base = parts["quantized_weights"] + parts["quant_constants"]
        lines.append(f"| {data} x {fsdp} | {shape.batch} | {base / GIB:.2f} GiB | "
                     f"{parts['gathered_layer'] / GIB:.2f} GiB | "
                     f"{parts['unquantized_frozen'] / GIB:.2f} GiB | "
                     f"{(parts['lora_params'] + parts['lora_grads']) / GIB:.2f} GiB | "
                     f"{parts['optimizer_state'] / GIB:.2f} GiB | {parts['activations'] / GIB:.2f} GiB | "
                     f"**{parts['total'] / GIB:.1f} GiB** |")
    command = ("`python scripts/memory_table.py` (seq 512, one sequence per device, r=64 bf16 adapters as in "
               "`guanaco-65b-fsdp8.yaml`, NF4+DQ, layer checkpointing; the formula for a GPU)")
    return "\n".join(lines) + "\n\n" + command + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = table() + "\n" + mesh_table()
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
