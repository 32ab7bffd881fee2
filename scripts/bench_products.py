"""The XLA path's 4-bit products on the CPU: tiled (``qmatmul``) next to decoding the whole weight, in one run.

    python scripts/bench_products.py [--out benchmarks/results/bench_products_cpu.md]

For LLaMA-7B's linear shapes and a range of rows ``M`` (tokens of a micro-batch; 1-64 when
decoding), each product timed interleaved, repeat by repeat: the forward ``x @ dequant(W).T``
and the backward ``dy @ dequant(W)`` as ``qmatmul``'s XLA path runs them (tiled where
``qmatmul.tile_rows`` allows, else whole), and the reference that decodes the whole weight and
takes one dot (``pallas_kernels.nf4_matmul_reference`` / ``nf4_matmul_t_reference``). Random
N(0, 0.02) weights, NF4, blocksize 64, double quant; bf16 compute, as a 7B step runs; the
outputs are checked equal first (forward bit for bit; backward to the f32 summation order).
Medians in milliseconds; a ratio < 1 means the tiled path is faster.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import Report, int_list

from pallas_kernels import nf4_matmul_reference, nf4_matmul_t_reference
from qlora_jax import qmatmul
from qlora_jax.quant import quantize

SHAPES = {"7B q/k/v/o": (4096, 4096), "7B gate/up": (11008, 4096), "7B down": (4096, 11008)}


def measure(weight, rows: int, repeats: int) -> dict[str, float]:
    """Median seconds of the four products for ``rows`` rows of bf16 input, interleaved."""
    n, k = weight.shape
    keys = jax.random.split(jax.random.key(rows), 2)
    x = jax.random.normal(keys[0], (rows, k)).astype(jnp.bfloat16)
    dy = jax.random.normal(keys[1], (rows, n)).astype(jnp.bfloat16)
    products = {"forward whole": (nf4_matmul_reference, x), "forward ours": (qmatmul._xla_forward, x),
                "backward whole": (nf4_matmul_t_reference, dy), "backward ours": (qmatmul._xla_backward, dy)}
    compiled = {name: (jax.jit(fn), a) for name, (fn, a) in products.items()}
    outputs = {name: np.asarray(fn(a, weight), np.float32) for name, (fn, a) in compiled.items()}
    if not np.array_equal(outputs["forward whole"], outputs["forward ours"]):
        raise SystemExit(f"error: the tiled forward product differs from the reference at {n}x{k}, M={rows}")
    scale = np.abs(outputs["backward whole"]).max()
    if np.abs(outputs["backward whole"] - outputs["backward ours"]).max() > 2 ** -6 * scale:
        raise SystemExit(f"error: the tiled backward product differs from the reference at {n}x{k}, M={rows}")
    times = {name: [] for name in compiled}
    for _ in range(repeats):
        for name, (fn, a) in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(a, weight))
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int_list, default=(1, 64, 512, 2048), help="rows M, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the table (markdown) to this file, line by line")
    args = parser.parse_args()
    report = Report(args.out)
    report("# 4-bit products on the CPU: tiled vs whole-weight decoding (XLA path)", "",
           f"jax {jax.__version__}, backend {jax.default_backend()}; NF4, blocksize 64, double quant, bf16; median "
           f"of {args.repeats}, products interleaved; load average {os.getloadavg()[0]:.2f} at the start; "
           f"`python scripts/bench_products.py {' '.join(sys.argv[1:])}`", "",
           "Milliseconds per product; tiles: rows of the weight decoded per step (- : decoded whole, so ours "
           "is the reference); ratio = ours / whole.", "",
           "| weight (N x K) | M | tiles | forward whole | forward ours | ratio | backward whole | backward ours "
           "| ratio |", "|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for label, (n, k) in SHAPES.items():
        weight = quantize(jnp.asarray(rng.standard_normal((n, k), np.float32) * 0.02), "nf4", 64, True)
        for rows in args.rows:
            ms = {name: 1000 * t for name, t in measure(weight, rows, args.repeats).items()}
            tiles = qmatmul.tile_rows(n, k, 64, rows, 2) or "-"
            report(f"| {label} ({n} x {k}) | {rows} | {tiles} | {ms['forward whole']:.1f} | {ms['forward ours']:.1f} "
                   f"| {ms['forward ours'] / ms['forward whole']:.2f} | {ms['backward whole']:.1f} | "
                   f"{ms['backward ours']:.1f} | {ms['backward ours'] / ms['backward whole']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
