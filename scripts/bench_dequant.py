"""Dequantization speed on the CPU: ours (C++ kernel, XLA path) next to bitsandbytes' ``dequantize_4bit``.

    python scripts/bench_dequant.py [--out benchmarks/results/bench_dequant_cpu.md]   # needs the oracle extra

Weights: random N(0, 0.02) quantized by bitsandbytes (NF4, blocksize 64, double quant) and
read into our ``QuantizedTensor`` bit for bit (``from_bnb_state_dict``), in SmolLM2-135M's and
LLaMA-7B's linear shapes. For each, interleaved repeat by repeat: ours
(``qlora_jax.quant.dequantize`` under ``jax.jit``, as it runs inside a train step: the
double-quant absmax decoded by XLA, the codes by the C++ kernel of ``quant.cpu_kernel``), the
same decode on the XLA path (``cpu_kernel=False``) and bitsandbytes' ``dequantize_4bit`` on 1
torch thread (2 stall on this shared 2-core machine); f32 and bf16
outputs. "x8": ours decoding 8 stacked weights in one call, one per step of a ``lax.scan`` into
a buffer that each step overwrites, as the train step's layer scan decodes its weights (the
per-call dispatch, tens of microseconds, is spread over them, and no 8 outputs stay alive),
next to 8 back-to-back bitsandbytes calls, each output freed before the next, as a PyTorch
forward pass does ("bnb x8"). Medians, in elements per second; each repeat times every path
of every shape in turn. The outputs are checked bit-equal first.

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

from qlora_jax.quant import QuantizedTensor, cpu_kernel, dequantize

SHAPES = {"SmolLM2 q/o": (576, 576), "SmolLM2 gate/up": (1536, 576), "SmolLM2 down": (576, 1536),
          "7B q/k/v/o": (4096, 4096), "7B gate/up": (11008, 4096)}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
IN_GRAPH = 8  # weights per call for the x8 columns: what one decode costs inside a compiled step


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _scan(shape, dtype, cpu_kernel: bool):
    """One compiled call decoding ``IN_GRAPH`` stacked weights, one per scan step, into one overwritten buffer."""
    return jax.jit(lambda qs: jax.lax.scan(lambda _, q: (dequantize(q, dtype, cpu_kernel), None),
                                           jnp.zeros(shape, dtype), qs)[0])


def prepare(peer: Peer, name: str, shape, scratch: Path) -> dict:
    """The timed paths for one weight shape (each returns seconds), after checking their outputs."""
    path = scratch / f"{shape[0]}x{shape[1]}.npz"
    peer.ask(op="bnb_quantize", name=name, shape=list(shape), seed=0, path=str(path))
    saved = dict(np.load(path))
    q = QuantizedTensor.from_bnb_state_dict(saved, "w.")
    stacked = jax.tree.map(lambda leaf: jnp.stack([leaf] * IN_GRAPH), q)  # 8 weights, as the layer scan holds them
    paths = {}
    for label, dtype in DTYPES.items():
        ours = jax.jit(lambda q, dtype=dtype: dequantize(q, dtype))
        if not np.array_equal(np.asarray(ours(q), np.float32), saved[f"expected_{label}"]):
            raise SystemExit(f"error: our {label} dequantization of {shape} differs from bitsandbytes'")
        batch, xla_batch = _scan(shape, dtype, True), _scan(shape, dtype, False)
        if not np.array_equal(np.asarray(batch(stacked), np.float32), np.asarray(xla_batch(stacked), np.float32)):
            raise SystemExit(f"error: the kernel's and the XLA path's {label} decode of {shape} differ")
        paths[f"ours {label}"] = lambda ours=ours: _time(lambda: jax.block_until_ready(ours(q)))
        paths[f"ours x8 {label}"] = lambda batch=batch: _time(lambda: jax.block_until_ready(batch(stacked)))
        paths[f"xla x8 {label}"] = lambda batch=xla_batch: _time(lambda: jax.block_until_ready(batch(stacked)))
        paths[f"bnb {label}"] = lambda label=label: peer.ask(op="bnb_dequantize", name=name, dtype=label,
                                                             count=1)["seconds"]
        paths[f"bnb x8 {label}"] = lambda label=label: peer.ask(op="bnb_dequantize", name=name, dtype=label,
                                                                count=IN_GRAPH)["seconds"]
    return paths


def measure(peer: Peer, repeats: int, scratch: Path) -> dict[str, dict[str, float]]:
    """Median seconds per weight of each path for every shape. Each repeat runs every path of every shape in
    turn, so a burst of load on this shared machine spreads over all cells instead of one shape's row."""
    paths = {label: prepare(peer, label, shape, scratch) for label, shape in SHAPES.items()}
    times = {label: {name: [] for name in by_name} for label, by_name in paths.items()}
    for _ in range(repeats + 1):  # the first round warms up (compiles)
        for label, by_name in paths.items():
            for name, fn in by_name.items():
                times[label][name].append(fn())
    return {label: {name: statistics.median(t[1:]) / (IN_GRAPH if name.startswith(("ours x8", "bnb x8", "xla x8"))
                                                       else 1) for name, t in by_name.items()}
            for label, by_name in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, help="also write the table (markdown) to this file, line by line")
    args = parser.parse_args()
    peer = Peer(Path("-"))
    report = Report(args.out)
    if not cpu_kernel.load():
        raise SystemExit("error: the C++ decode kernel could not be built here (see the warning above)")
    report("# NF4 dequantization on the CPU, ours vs bitsandbytes", "",
           f"jax {jax.__version__}; torch "
           f"{peer.info['torch']} ({peer.info['threads']} thread) and bitsandbytes in their own process; NF4, "
           f"blocksize 64, double quant; median of {args.repeats}, every path of every shape interleaved; load average "
           f"{os.getloadavg()[0]:.2f} at the start; `python scripts/bench_dequant.py {' '.join(sys.argv[1:])}`", "",
           "G elements/s (higher is faster); a ratio > 1 means ours is faster. One call: one weight per call, "
           "dispatch included; x8: 8 weights back to back (ours in one compiled scan, bnb in 8 calls); "
           "ours: the C++ kernel (quant.cpu_kernel); XLA path: the same scan with cpu_kernel=False.", "",
           "| weight (N x K) | ours f32 | bnb f32 | ratio | ours bf16 | bnb bf16 | ratio | ours x8 f32 | bnb x8 f32 | "
           "ratio | ours x8 bf16 | bnb x8 bf16 | ratio | XLA path x8 f32 | XLA path x8 bf16 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench_dequant_") as scratch:
        seconds = measure(peer, args.repeats, Path(scratch))
    for label, shape in SHAPES.items():
        rate = {name: shape[0] * shape[1] / t / 1e9 for name, t in seconds[label].items()}
        cells = []
        for ours, bnb in (("ours f32", "bnb f32"), ("ours bf16", "bnb bf16"), ("ours x8 f32", "bnb x8 f32"),
                          ("ours x8 bf16", "bnb x8 bf16")):
            cells += [f"{rate[ours]:.2f}", f"{rate[bnb]:.2f}", f"{rate[ours] / rate[bnb]:.2f}"]
        cells += [f"{rate['xla x8 f32']:.2f}", f"{rate['xla x8 bf16']:.2f}"]
        report(f"| {label} ({shape[0]} x {shape[1]}) | " + " | ".join(cells) + " |")
    report("", f"Load average at the end: {os.getloadavg()[0]:.2f}.")
    peer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
