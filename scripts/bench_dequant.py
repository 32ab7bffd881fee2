"""Dequantization speed on the CPU: our XLA paths next to bitsandbytes' ``dequantize_4bit``, in one run.

    python scripts/bench_dequant.py [--out benchmarks/results/bench_dequant_cpu.md]   # needs the oracle extra

Weights: random N(0, 0.02) quantized by bitsandbytes (NF4, blocksize 64, double quant) and
read into our ``QuantizedTensor`` bit for bit (``from_bnb_state_dict``), in SmolLM2-135M's and
LLaMA-7B's linear shapes. For each, interleaved repeat by repeat: ours
(``qlora_jax.quant.dequantize`` under ``jax.jit``, as it runs inside a train step: unpack,
one table lookup per code, double-quant absmax decoded inside) and bitsandbytes'
``dequantize_4bit`` on 1 torch thread (2 stall on this shared 2-core machine); f32 and bf16
outputs. "x8": ours decoding 8 stacked weights in one call, one per step of a ``lax.scan`` into
a buffer that each step overwrites, as the train step's layer scan decodes its weights (the
per-call dispatch, tens of microseconds, is spread over them, and no 8 outputs stay alive),
next to 8 back-to-back bitsandbytes calls, each output freed before the next, as a PyTorch
forward pass does ("bnb x8"). Medians, in elements per second. The outputs are checked
bit-equal first.

Each system runs in its own process, as each runs for its users (no shared thread pools or
allocator): bitsandbytes in ``scripts/peer_worker.py`` (torch), ours here, without torch.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import Peer, Report

from qlora_jax.quant import QuantizedTensor, dequantize

SHAPES = {"SmolLM2 q/o": (576, 576), "SmolLM2 gate/up": (1536, 576), "SmolLM2 down": (576, 1536),
          "7B q/k/v/o": (4096, 4096), "7B gate/up": (11008, 4096)}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
IN_GRAPH = 8  # weights per call for the x8 columns: what one decode costs inside a compiled step


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bytes_to_f32(q: QuantizedTensor) -> jax.Array:
    """The ceiling of the x8 f32 column: each byte converted to f32 twice, times its block's absmax, with no
    lookup, in the decode's ``[blocks, blocksize/2, 2]`` layout (not equal to the weight; a speed reference)."""
    absmax = q.absmax_f32()
    pairs = jnp.broadcast_to(q.packed.reshape(absmax.shape[0], -1, 1), (absmax.shape[0], q.blocksize // 2, 2))
    return (pairs.astype(jnp.float32) * absmax[:, None, None]).reshape(q.shape)


def measure(peer: Peer, shape, repeats: int, scratch: Path) -> dict[str, float]:
    """Median seconds of each path for one weight shape, the paths interleaved within each repeat."""
    path = scratch / f"{shape[0]}x{shape[1]}.npz"
    peer.ask(op="bnb_quantize", shape=list(shape), seed=0, path=str(path))
    saved = dict(np.load(path))
    q = QuantizedTensor.from_bnb_state_dict(saved, "w.")
    stacked = jax.tree.map(lambda leaf: jnp.stack([leaf] * IN_GRAPH), q)  # 8 weights, as the layer scan holds them
    paths = {}
    for label, dtype in DTYPES.items():
        ours = jax.jit(lambda q, dtype=dtype: dequantize(q, dtype))
        if not np.array_equal(np.asarray(ours(q), np.float32), saved[f"expected_{label}"]):
            raise SystemExit(f"error: our {label} dequantization of {shape} differs from bitsandbytes'")
        batch = jax.jit(lambda qs, dtype=dtype: jax.lax.scan(lambda _, q: (dequantize(q, dtype), None),
                                                             jnp.zeros(shape, dtype), qs)[0])
        paths[f"ours {label}"] = lambda ours=ours: _time(lambda: jax.block_until_ready(ours(q)))
        paths[f"ours x8 {label}"] = lambda batch=batch: _time(lambda: jax.block_until_ready(batch(stacked)))
        paths[f"bnb {label}"] = lambda label=label: peer.ask(op="bnb_dequantize", dtype=label, count=1)["seconds"]
        paths[f"bnb x8 {label}"] = lambda label=label: peer.ask(op="bnb_dequantize", dtype=label,
                                                                count=IN_GRAPH)["seconds"]
    no_lookup = jax.jit(lambda qs: jax.lax.scan(lambda _, q: (_bytes_to_f32(q), None), jnp.zeros(shape), qs)[0])
    paths["no lookup"] = lambda: _time(lambda: jax.block_until_ready(no_lookup(stacked)))
    for fn in paths.values():
        fn()  # compile and warm up
    times = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            times[name].append(fn())
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {name: t / IN_GRAPH if name.startswith(("ours x8", "bnb x8", "no lookup")) else t
            for name, t in medians.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, help="also write the table (markdown) to this file, line by line")
    args = parser.parse_args()
    peer = Peer(Path("-"))
    report = Report(args.out)
    report("# NF4 dequantization on the CPU, ours (XLA) vs bitsandbytes", "",
           f"jax {jax.__version__}; torch "
           f"{peer.info['torch']} ({peer.info['threads']} thread) and bitsandbytes in their own process; NF4, "
           f"blocksize 64, double quant; median of {args.repeats}, paths interleaved; load average "
           f"{os.getloadavg()[0]:.2f} at the start; `python scripts/bench_dequant.py {' '.join(sys.argv[1:])}`", "",
           "G elements/s (higher is faster); a ratio > 1 means ours is faster. One call: one weight per call, "
           "dispatch included; x8: 8 weights back to back (ours in one compiled scan, bnb in 8 calls); "
           "no lookup: the x8 f32 scan writing each byte as two f32 times its absmax, without the 16-entry "
           "table (what XLA's CPU backend writes without the lookup).", "",
           "| weight (N x K) | ours f32 | bnb f32 | ratio | ours bf16 | bnb bf16 | ratio | ours x8 f32 | bnb x8 f32 | "
           "ratio | ours x8 bf16 | bnb x8 bf16 | ratio | no lookup x8 f32 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench_dequant_") as scratch:
        for label, shape in SHAPES.items():
            seconds = measure(peer, shape, args.repeats, Path(scratch))
            rate = {name: shape[0] * shape[1] / t / 1e9 for name, t in seconds.items()}
            cells = []
            for ours, bnb in (("ours f32", "bnb f32"), ("ours bf16", "bnb bf16"), ("ours x8 f32", "bnb x8 f32"),
                              ("ours x8 bf16", "bnb x8 bf16")):
                cells += [f"{rate[ours]:.2f}", f"{rate[bnb]:.2f}", f"{rate[ours] / rate[bnb]:.2f}"]
            cells.append(f"{rate['no lookup']:.2f}")
            report(f"| {label} ({shape[0]} x {shape[1]}) | " + " | ".join(cells) + " |")
    peer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
