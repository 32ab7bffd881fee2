"""Check the fused 4-bit matmul kernels compiled by Triton, then time them against XLA and a bf16 dot.

    python scripts/bench_kernels.py --check [--out FILE]    # correctness only (gpu_check.sh step 1)
    python scripts/bench_kernels.py [--shapes 7b,70b] [--m 1,16,512,4096] [--out FILE]
    python scripts/bench_kernels.py --sweep                 # retune pallas_kernels.nf4_matmul.TUNED
    python scripts/bench_kernels.py --interpret ...         # the same on CPU, Pallas interpreted, tiny shapes

Correctness: every kernel (forward, split-K decode, transposed) is compiled and checked
against its XLA ``*_reference`` twin on fresh random inputs, for every table (nf4, fp4,
int4), bf16 and f16, M and N off the tiles and K split into 3 parts, plus LLaMA-sized
shapes; outputs must be finite (nothing unwritten) and within the per-dtype tolerance of
``tests/test_nf4_matmul.py``. Any mismatch stops the run with exit 1. The table: for each M
and the (N, K) shapes of LLaMA-7B and LLaMA-70B linear layers, the median time per product
of the Pallas forward kernel, of XLA dequantize + dot, and of a bf16 dot of the same shape
(``--calls`` products in one jitted loop over as many copies of the weight, as a layer scan
runs, so the 80-380 us that one jitted call costs on an H200 does not hide a product of a few
microseconds), each one's speed relative to bf16
(bf16 time / its time: above 1 is faster), TFLOP/s and GB/s;
then the transposed (input-gradient) product at M = 512 and 4096. Each line is written to
``--out`` as soon as it is measured. Needs a CUDA GPU unless ``--interpret``.
"""

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import Report, fail, int_list, median_seconds

from pallas_kernels import TUNED, nf4_matmul, nf4_matmul_reference, nf4_matmul_t, nf4_matmul_t_reference
from qlora_jax.quant import QuantizedTensor, quantize

M_VALUES = (1, 16, 512, 4096)
SHAPES = {  # layer: (N, K) of W: [N, K]
    "7B q/k/v/o": (4096, 4096), "7B gate/up": (11008, 4096), "7B down": (4096, 11008),
    "70B q/o": (8192, 8192), "70B k/v": (1024, 8192), "70B gate/up": (28672, 8192), "70B down": (8192, 28672),
}
TINY_SHAPES = {"tiny": (48, 192)}
# max |kernel - reference| / max |reference| (tests/test_nf4_matmul.py: 16-bit outputs rounded in other sum orders)
TOLERANCE = {"bfloat16": 8e-3, "float16": 1e-3}
# (M, N, K, quant_type, blocksize): M = 1 decodes through split-K (K / blocksize = 33 blocks: 3 splits);
# M = 130 and N = 1040 are off every tile; int4 at blocksize 128. Each runs in bf16 and f16.
EDGE_CASES = [(1, 1040, 2112, q, 64) for q in ("nf4", "fp4", "int4")] + \
             [(130, 1040, 2112, q, 64) for q in ("nf4", "fp4")] + [(70, 208, 1024, "int4", 128)]
LARGE_CASES = [(16, 4096, 4096, "nf4", 64), (512, 11008, 4096, "nf4", 64), (4096, 4096, 4096, "nf4", 64)]
TINY_CASES = [(1, 48, 192, "nf4", 64), (5, 48, 192, "fp4", 64), (3, 32, 256, "int4", 128)]


def _weight(n: int, k: int, seed: int, quant_type: str = "nf4",
            blocksize: int = 64) -> tuple[QuantizedTensor, jax.Array]:
    w = jax.random.normal(jax.random.key(seed), (n, k), jnp.bfloat16) * 0.02
    return quantize(w, quant_type, blocksize, True), w


def check_correctness(cases, report: Report, interpret: bool) -> bool:
    """Compile and compare every kernel on every case in bf16 and f16; one report line per check."""
    ok_all = True
    for seed, (m, n, k, quant_type, blocksize) in enumerate(cases):
        weight, _ = _weight(n, k, 100 + seed, quant_type, blocksize)
        for dtype in (jnp.bfloat16, jnp.float16):
            key_x, key_dy = jax.random.split(jax.random.key(200 + seed))
            x = jax.random.normal(key_x, (m, k), dtype)
            dy = jax.random.normal(key_dy, (m, n), dtype)
            for name, kernel, reference, a in [("forward" if m > 16 else "split-K decode", nf4_matmul,
                                                nf4_matmul_reference, x),
                                               ("transposed", nf4_matmul_t, nf4_matmul_t_reference, dy)]:
                got = np.asarray(jax.jit(functools.partial(kernel, interpret=interpret))(a, weight), np.float32)
                want = np.asarray(jax.jit(reference)(a, weight), np.float32)
                error = np.abs(got - want).max() / np.abs(want).max()
                ok = bool(np.isfinite(got).all()) and error <= TOLERANCE[jnp.dtype(dtype).name]
                ok_all &= ok
                report(f"- {name} M={m} N={n} K={k} {quant_type} blocksize {blocksize} {jnp.dtype(dtype).name}: "
                       f"relative error {error:.2e} ({'ok' if ok else 'FAIL'})")
    return ok_all


def per_product_seconds(product, a: jax.Array, weight, calls: int, repeats: int) -> float:
    """Median seconds per ``product(a, weight)`` over runs of ``calls`` products in one jitted loop.

    The loop goes over ``calls`` copies of the weight, one per product, as a model's layer scan
    goes over its stacked weights: no product is loop-invariant, so none is hoisted out of the
    loop, and each reads its weight from memory rather than from the cache of the one before.
    Each product's input gets the previous output's maximum times zero added (XLA keeps ``x * 0``
    for floats), which chains the products; that is a pass over the input and one over the output.
    """
    stacked = jax.tree.map(lambda leaf: jnp.stack([leaf] * calls), weight)

    def run(a, stacked):
        def step(i, a):
            layer = jax.tree.map(lambda leaf: leaf[i], stacked)
            return a + (product(a, layer).max() * 0).astype(a.dtype)

        return jax.lax.fori_loop(0, calls, step, a)

    return median_seconds(functools.partial(jax.jit(run), a, stacked), repeats) / calls


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


def bench_table(m_values, shapes, transposed: bool, report: Report, interpret: bool, repeats: int,
                calls: int) -> None:
    kernel, reference = (nf4_matmul_t, nf4_matmul_t_reference) if transposed else (nf4_matmul, nf4_matmul_reference)
    kernel = functools.partial(kernel, interpret=interpret)

    def bf16_dot(a, w):
        return a @ w if transposed else a @ w.T

    report(HEADER)
    for label, (n, k) in shapes.items():
        weight, dense = _weight(n, k, 0)
        for m in m_values:
            a = jax.random.normal(jax.random.key(m), (m, n if transposed else k), jnp.bfloat16)
            seconds = {"pallas": per_product_seconds(kernel, a, weight, calls, repeats),
                       "xla": per_product_seconds(reference, a, weight, calls, repeats),
                       "bf16": per_product_seconds(bf16_dot, a, dense, calls, repeats)}
            report(_row(f"{label} ({n} x {k})", m, n, k, seconds))


def sweep(report: Report, calls: int) -> None:
    """Time candidate tile sizes for each shape class of ``TUNED`` on LLaMA-7B's gate/up shape."""
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
                            t = per_product_seconds(functools.partial(nf4_matmul, block_sizes=sizes), x, weight,
                                                    calls, 10)
                        except Exception as exc:  # a tile Triton cannot compile is skipped, not fatal
                            print(f"  skip {sizes}: {type(exc).__name__}", file=sys.stderr)
                            continue
                        results.append((t, sizes))
        best_t, best = min(results, key=lambda r: r[0])
        report(f"- M <= {max_m}: best {best} at {best_t * 1e6:.1f} us (tuned entry: {tuned})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also write the report (markdown) to this file, line by line")
    parser.add_argument("--check", action="store_true", help="only the correctness checks")
    parser.add_argument("--skip-check", action="store_true", help="time only (the checks ran in another call)")
    parser.add_argument("--sweep", action="store_true", help="time tile sizes instead of printing the table")
    parser.add_argument("--shapes", default="7b,70b", help="comma-separated: 7b, 70b")
    parser.add_argument("--m", type=int_list, default=M_VALUES, help="rows of activations, comma-separated")
    parser.add_argument("--interpret", action="store_true", help="run the kernels in Pallas' interpreter (any backend)")
    parser.add_argument("--calls", type=int, help="products per timed jitted loop (default 20; 2 with --interpret)")
    args = parser.parse_args()
    prefixes = tuple(p.strip().upper() + " " for p in args.shapes.split(","))
    if not set(prefixes) <= {"7B ", "70B "}:
        return fail(f"--shapes {args.shapes!r}: expected a comma-separated list of 7b, 70b")
    if jax.default_backend() != "gpu" and not args.interpret:
        return fail(f"bench_kernels.py needs a CUDA GPU (or --interpret); this backend is {jax.default_backend()!r}")
    calls = args.calls or (2 if args.interpret else 20)
    report = Report(args.out)
    where = jax.devices()[0].device_kind + (" (Pallas interpreter)" if args.interpret else "")
    report(f"# 4-bit matmul kernels on {where}",
           "", f"jax {jax.__version__}, blocksize 64 unless stated, double quant; time per product over loops of "
           f"{calls} products; `python scripts/bench_kernels.py "
           f"{' '.join(sys.argv[1:])}`")
    if not args.skip_check:
        report("", "## Triton compile + correctness vs the XLA reference", "")
        if not check_correctness(TINY_CASES if args.interpret else EDGE_CASES + LARGE_CASES, report, args.interpret):
            print("error: a kernel disagrees with its XLA reference", file=sys.stderr)
            return 1
    if args.check:
        return 0
    if args.sweep:
        report("", "## Tile sweep", "")
        sweep(report, calls)
        return 0
    shapes = TINY_SHAPES if args.interpret else {k: v for k, v in SHAPES.items() if k.startswith(prefixes)}
    repeats = 2 if args.interpret else 10
    report("", "## y = x @ dequant(W).T (forward; M <= 16 decodes through split-K)", "")
    bench_table(args.m, shapes, transposed=False, report=report, interpret=args.interpret, repeats=repeats,
                calls=calls)
    report("", "## dx = dy @ dequant(W) (backward)", "")
    bench_table([m for m in args.m if m >= 512] or args.m[-1:], shapes, transposed=True, report=report,
                interpret=args.interpret, repeats=repeats, calls=calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
