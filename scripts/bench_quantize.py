"""Benchmark quantize + double-quantize against bitsandbytes, and the error of each 4-bit type.

    python scripts/bench_quantize.py                # qlora_jax alone
    python scripts/bench_quantize.py --with-bnb     # also bitsandbytes (needs the oracle extra)

Prints a markdown table: median wall time of NF4 + double quant of a
4096 x 11008 fp32 matrix (LLaMA-7B's MLP shape) with qlora_jax (jitted, after one
warm-up call) and with bitsandbytes 0.50 on the same CPU, and the mean squared
error of NF4 / FP4 / Int4 (blocksize 64, double quant) on N(0, 1) data and on the
real linear weights of SmolLM2-135M-Instruct.
"""

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_seconds

from qlora_jax import assets
from qlora_jax.quant import dequantize, quantize

LINEAR_SUFFIXES = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                   "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


def time_qlora_jax(x: np.ndarray, repeats: int) -> float:
    x_device = jnp.asarray(x)
    return median_seconds(lambda: jax.block_until_ready(quantize(x_device, "nf4", 64, True)), repeats)


def time_bitsandbytes(x: np.ndarray, repeats: int) -> float:
    import bitsandbytes.functional as bnbf
    import torch

    x_torch = torch.from_numpy(x)
    return median_seconds(lambda: bnbf.quantize_4bit(x_torch, blocksize=64, compress_statistics=True,
                                                     quant_type="nf4"), repeats)


def smollm2_linear_weights(max_layers: int) -> np.ndarray:
    """The q/k/v/o/gate/up/down weights of the first ``max_layers`` blocks, flattened to one f32 vector."""
    import gguf

    reader = gguf.GGUFReader(assets.smollm2_gguf())
    chunks = []
    for tensor in reader.tensors:
        block = tensor.name.split(".")
        if block[0] == "blk" and int(block[1]) < max_layers and tensor.name.endswith(LINEAR_SUFFIXES):
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            chunks.append(np.asarray(values, np.float32).reshape(-1))
    return np.concatenate(chunks)


def mse(x: np.ndarray, quant_type: str) -> float:
    q = quantize(jnp.asarray(x), quant_type, 64, True)
    return float(jnp.mean((dequantize(q, jnp.float32) - jnp.asarray(x)) ** 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=11008)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=30, help="SmolLM2 blocks whose weights enter the MSE")
    parser.add_argument("--with-bnb", action="store_true", help="also time bitsandbytes (oracle extra)")
    args = parser.parse_args()

    x = np.random.default_rng(0).standard_normal((args.rows, args.cols), dtype=np.float32)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {args.rows}x{args.cols} fp32, "
          f"NF4 + double quant, blocksize 64, median of {args.repeats}\n")
    ours = time_qlora_jax(x, args.repeats)
    print("| implementation | seconds | vs bitsandbytes |\n|---|---|---|")
    if args.with_bnb:
        import bitsandbytes
        import torch

        theirs = time_bitsandbytes(x, args.repeats)
        print(f"| qlora_jax | {ours:.3f} | {theirs / ours:.2f}x faster |")
        print(f"| bitsandbytes {bitsandbytes.__version__} (torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads) | {theirs:.3f} | 1.00x |")
    else:
        print(f"| qlora_jax | {ours:.3f} | (run with --with-bnb) |")

    try:
        real = smollm2_linear_weights(args.layers)
    except FileNotFoundError as err:
        print(f"\nskipping real weights: {err}", file=sys.stderr)
        real = None
    print("\n| 4-bit type (blocksize 64, double quant) | MSE on N(0,1) | MSE on SmolLM2-135M linear weights |")
    print("|---|---|---|")
    for quant_type in ("nf4", "fp4", "int4"):
        real_mse = f"{mse(real, quant_type):.3e}" if real is not None else "n/a"
        print(f"| {quant_type} | {mse(x, quant_type):.5f} | {real_mse} |")
    if real is not None:
        print(f"\nSmolLM2 weights: {real.size:,} values from {args.layers} blocks, variance {real.var():.3e}")


if __name__ == "__main__":
    main()
