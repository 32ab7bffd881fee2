"""Dequantization speed on the CPU: our XLA paths next to bitsandbytes' ``dequantize_4bit``, in one run.

    python scripts/bench_dequant.py [--out benchmarks/results/bench_dequant_cpu.md]   # needs the oracle extra

Weights: random N(0, 0.02) quantized by bitsandbytes (NF4, blocksize 64, double quant) and
read into our ``QuantizedTensor`` bit for bit (``from_bnb_state_dict``), in SmolLM2-135M's and
LLaMA-7B's linear shapes. For each, interleaved repeat by repeat: ours
(``qlora_jax.quant.dequantize`` under ``jax.jit``, as it runs inside a train step: unpack,
one table lookup per code, double-quant absmax decoded inside) and bitsandbytes'
``dequantize_4bit`` on 1 torch thread (2 stall on this shared 2-core machine); f32 and bf16
outputs. "in-graph": ours with 8 weights decoded per call, so that the per-call dispatch
(tens of microseconds, which a train step does not pay per weight) is spread over them.
Medians, in elements per second. The outputs are checked bit-equal first.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import torch
from bench_common import Report

from qlora_jax.quant import QuantizedTensor, dequantize

SHAPES = {"SmolLM2 q/o": (576, 576), "SmolLM2 gate/up": (1536, 576), "SmolLM2 down": (576, 1536),
          "7B q/k/v/o": (4096, 4096), "7B gate/up": (11008, 4096)}
DTYPES = {"f32": (jnp.float32, torch.float32), "bf16": (jnp.bfloat16, torch.bfloat16)}


def _ours(dtype):
    return jax.jit(lambda q: dequantize(q, dtype))


IN_GRAPH = 8  # weights per call for the in-graph column: what one decode costs inside a compiled step


def _ours_in_graph(dtype):
    return jax.jit(lambda qs: [dequantize(q, dtype) for q in qs])


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(shape, repeats: int) -> dict[str, float]:
    """Median seconds of each path for one weight shape, the paths interleaved within each repeat."""
    weight = torch.randn(*shape) * 0.02
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    saved = {"w.weight": packed, **{f"w.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    q = QuantizedTensor.from_bnb_state_dict({k: v.numpy() for k, v in saved.items()}, "w.")
    paths = {}
    for label, (jax_dtype, torch_dtype) in DTYPES.items():
        ours = _ours(jax_dtype)
        bnb_state = bnbf.QuantState.from_dict(state.as_dict(packed=True), device=torch.device("cpu"))
        bnb_state.dtype = torch_dtype
        expected = bnbf.dequantize_4bit(packed, bnb_state).float().numpy()
        if not np.array_equal(np.asarray(ours(q), np.float32), expected):
            raise SystemExit(f"error: our {label} dequantization of {shape} differs from bitsandbytes'")
        paths[f"ours {label}"] = lambda ours=ours: jax.block_until_ready(ours(q))
        batch = _ours_in_graph(jax_dtype)
        paths[f"in-graph {label}"] = lambda batch=batch: jax.block_until_ready(batch([q] * IN_GRAPH))
        paths[f"bnb {label}"] = lambda s=bnb_state: bnbf.dequantize_4bit(packed, s)
    for fn in paths.values():
        fn()  # compile and warm up
    times = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            times[name].append(_time(fn))
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {name: t / IN_GRAPH if name.startswith("in-graph") else t for name, t in medians.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, help="also write the table (markdown) to this file, line by line")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = Report(args.out)
    report("# NF4 dequantization on the CPU, ours (XLA) vs bitsandbytes", "",
           f"jax {jax.__version__}, torch {torch.__version__} (1 thread), bitsandbytes; NF4, blocksize 64, double "
           f"quant; median of {args.repeats}, paths interleaved; load average {os.getloadavg()[0]:.2f} at the start; "
           f"`python scripts/bench_dequant.py {' '.join(sys.argv[1:])}`", "",
           "G elements/s (higher is faster); ours / bnb > 1 means ours is faster.", "",
           "| weight (N x K) | ours f32 | bnb f32 | ours/bnb f32 | ours bf16 | bnb bf16 | ours/bnb bf16 | "
           "in-graph f32 | in-graph bf16 | in-graph/bnb bf16 |", "|---|---|---|---|---|---|---|---|---|---|")
    for label, shape in SHAPES.items():
        seconds = measure(shape, args.repeats)
        rate = {name: shape[0] * shape[1] / t / 1e9 for name, t in seconds.items()}
        report(f"| {label} ({shape[0]} x {shape[1]}) | {rate['ours f32']:.2f} | {rate['bnb f32']:.2f} | "
               f"{rate['ours f32'] / rate['bnb f32']:.2f} | {rate['ours bf16']:.2f} | {rate['bnb bf16']:.2f} | "
               f"{rate['ours bf16'] / rate['bnb bf16']:.2f} | {rate['in-graph f32']:.2f} | "
               f"{rate['in-graph bf16']:.2f} | {rate['in-graph bf16'] / rate['bnb bf16']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
