"""Benchmark the fused 4-bit matmul kernels on a GPU against XLA dequantize+dot and a bf16 dot.

    python scripts/bench_kernels.py [--out benchmarks/results/bench_kernels_gpu.md]
    python scripts/bench_kernels.py --sweep     # retune pallas_kernels.nf4_matmul.TUNED

First compiles every kernel with the real Triton compiler and checks it against the XLA
reference on random inputs (bf16, relative error <= 8e-3); any mismatch stops the run.
Then prints one markdown table: for M in {1, 4, 16, 64, 512, 4096} and the (N, K)
shapes of LLaMA-7B and LLaMA-70B linear layers, the median time of the Pallas forward
kernel, of XLA dequantize + dot, and of a bf16 dot of the same shape, each one's speed
relative to bf16 (bf16 time / its time: above 1 is faster), achieved TFLOP/s and GB/s;
and the same for the transposed (input-gradient) product at training sizes. Needs a
CUDA GPU; on any other backend it says so and exits 2.
"""

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import TUNED, nf4_matmul, nf4_matmul_reference, nf4_matmul_t, nf4_matmul_t_reference
from qlora_jax.quant import QuantizedTensor, quantize

M_VALUES = (1, 4, 16, 64, 512, 4096)
SHAPES = {  # layer: (N, K) of W: [N, K]
    "7B q/k/v/o": (4096, 4096), "7B gate/up": (11008, 4096), "7B down": (4096, 11008),
    "70B q/o": (8192, 8192), "70B k/v": (1024, 8192), "70B gate/up": (28672, 8192), "70B down": (8192, 28672),
}
TOLERANCE = 8e-3


def _median_seconds(fn, *args, repeats: int = 30) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _weight(n: int, k: int, seed: int) -> tuple[QuantizedTensor, jax.Array]:
    w = jax.random.normal(jax.random.key(seed), (n, k), jnp.bfloat16) * 0.02
    return quantize(w, "nf4", 64, True), w


def check_correctness() -> list[str]:
    """Real Triton compile of every kernel and shape class; returns one line per check."""
    lines = []
    for m in (1, 16, 64, 512, 4096):
        weight, _ = _weight(4096, 4096, m)
        x = jax.random.normal(jax.random.key(m + 1), (m, 4096), jnp.bfloat16)
        for name, kernel, reference in [("forward", nf4_matmul, nf4_matmul_reference),
                                        ("transposed", nf4_matmul_t, nf4_matmul_t_reference)]:
            got = np.asarray(jax.jit(kernel)(x, weight), np.float32)
            want = np.asarray(jax.jit(reference)(x, weight), np.float32)
            error = np.abs(got - want).max() / np.abs(want).max()
            ok = np.isfinite(got).all() and error <= TOLERANCE
            lines.append(f"- {name} M={m}: relative error {error:.2e} ({'ok' if ok else 'FAIL'})")
            if not ok:
                raise SystemExit("\n".join(lines) + f"\nerror: {name} kernel disagrees with the XLA reference")
    return lines


def _row(label: str, m: int, n: int, k: int, seconds: dict[str, float]) -> str:
    flops = 2 * m * n * k
    packed_bytes = n * k / 2 + n * k / 64 + n * k / 64 / 256 * 4  # codes, u8 absmax codes, nested absmax
    activation_bytes = 2 * (m * k + m * n)
    bf16_bytes = 2 * n * k + activation_bytes
    cells = [label, str(m)]
    for name in ("pallas", "xla", "bf16"):
        t = seconds[name]
        moved = bf16_bytes if name == "bf16" else packed_bytes + activation_bytes
        cells += [f"{t * 1e6:.1f}", f"{seconds['bf16'] / t:.2f}x", f"{flops / t / 1e12:.1f}", f"{moved / t / 1e9:.0f}"]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| layer (N x K) | M | pallas us | vs bf16 | TFLOP/s | GB/s | xla us | vs bf16 | TFLOP/s | GB/s "
          "| bf16 us | vs bf16 | TFLOP/s | GB/s |\n|" + "---|" * 14)


def bench_table(m_values, shapes, transposed: bool) -> list[str]:
    kernel, reference = (nf4_matmul_t, nf4_matmul_t_reference) if transposed else (nf4_matmul, nf4_matmul_reference)
    bf16_dot = jax.jit(lambda a, w: a @ w if transposed else a @ w.T)
    lines = [HEADER]
    for label, (n, k) in shapes.items():
        weight, dense = _weight(n, k, 0)
        for m in m_values:
            a = jax.random.normal(jax.random.key(m), (m, n if transposed else k), jnp.bfloat16)
            seconds = {"pallas": _median_seconds(jax.jit(kernel), a, weight),
                       "xla": _median_seconds(jax.jit(reference), a, weight),
                       "bf16": _median_seconds(bf16_dot, a, dense)}
            lines.append(_row(f"{label} ({n} x {k})", m, n, k, seconds))
            print(lines[-1], flush=True)
    return lines


def sweep() -> list[str]:
    """Time candidate tile sizes for each shape class of ``TUNED`` on LLaMA-7B's gate/up shape."""
    lines = []
    weight, _ = _weight(11008, 4096, 0)
    for max_m, tuned in TUNED:
        m = min(max_m, 4096)
        x = jax.random.normal(jax.random.key(m), (m, 4096), jnp.bfloat16)
        results = []
        for block_m in sorted({tuned.block_m, 16, 32, 64, 128}):
            for block_n in (32, 64, 128, 256):
                for splits in (1, 2, 4, 8) if m <= 16 else (1,):
                    for num_warps in (4, 8):
                        sizes = dataclasses.replace(tuned, block_m=block_m, block_n=block_n, splits=splits,
                                                    num_warps=num_warps)
                        try:
                            t = _median_seconds(jax.jit(lambda a, w, s=sizes: nf4_matmul(a, w, block_sizes=s)),
                                                x, weight, repeats=10)
                        except Exception as exc:  # a tile Triton cannot compile is skipped, not fatal
                            print(f"  skip {sizes}: {type(exc).__name__}", file=sys.stderr)
                            continue
                        results.append((t, sizes))
        best_t, best = min(results, key=lambda r: r[0])
        lines.append(f"- M <= {max_m}: best {best} at {best_t * 1e6:.1f} us (tuned entry: {tuned})")
        print(lines[-1], flush=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also write the report (markdown) to this file")
    parser.add_argument("--sweep", action="store_true", help="time tile sizes instead of printing the table")
    parser.add_argument("--quick", action="store_true", help="only the LLaMA-7B shapes")
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        print(f"error: bench_kernels.py needs a CUDA GPU; this backend is {jax.default_backend()!r}", file=sys.stderr)
        return 2
    device = jax.devices()[0]
    report = [f"# 4-bit matmul kernels on {device.device_kind}", "",
              f"jax {jax.__version__}, NF4 + double quant, blocksize 64, bf16 activations; "
              f"`python scripts/bench_kernels.py{' --sweep' if args.sweep else ''}`", "",
              "## Triton compile + correctness vs the XLA reference", ""]
    report += check_correctness()
    if args.sweep:
        report += ["", "## Tile sweep", ""] + sweep()
    else:
        shapes = {k: v for k, v in SHAPES.items() if k.startswith("7B")} if args.quick else SHAPES
        report += ["", "## y = x @ dequant(W).T (forward and decode)", ""]
        report += bench_table(M_VALUES, shapes, transposed=False)
        report += ["", "## dx = dy @ dequant(W) (backward)", ""]
        report += bench_table((512, 4096), shapes, transposed=True)
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
