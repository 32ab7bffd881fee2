"""What LoftQ initialization costs at load time: ``loftq.loftq`` per weight shape, against plain quantization.

    python scripts/bench_loftq.py [--model smollm2-135m-instruct,llama-7b] [--rank 16] [--iters 1,5]
                                  [--out benchmarks/results/bench_loftq_cpu.md]

For each model, one decoder layer's seven weights (random N(0, 0.02), bf16): the median wall
time of NF4 + double quant (what loading does without LoftQ) and of ``loftq`` with 1 and 5
alternations (each adds a quantization and a truncated SVD of the f32 residual), then the
whole model's extra load time, per layer times the layer count.
"""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from bench_common import RANDOM_MODELS, Report, int_list, median_seconds

from qlora_jax.config import QuantConfig
from qlora_jax.loading import read_config
from qlora_jax.loftq import loftq
from qlora_jax.model_source import resolve_model_dir
from qlora_jax.quant import quantize


def model_config(name: str):
    """A preset's shapes (``bench_common.RANDOM_MODELS``), or a model's own (a directory or built-in name)."""
    return RANDOM_MODELS[name] if name in RANDOM_MODELS else read_config(resolve_model_dir(name))[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct,llama-7b")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int_list, default=(1, 5))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    quant = QuantConfig("nf4", 64, True)
    report = Report(args.out)
    report(f"# LoftQ initialization cost (jax {jax.__version__}, {jax.devices()[0].platform}, r={args.rank})", "",
           f"`python scripts/bench_loftq.py --model {args.model} --iters {','.join(map(str, args.iters))} "
           f"--repeats {args.repeats}`: one decoder layer's 7 weights (random, bf16), median of {args.repeats} after "
           "one warm-up call; whole model = per layer x layers", "",
           "| model | NF4 + DQ quantize, per layer | " + " | ".join(f"LoftQ {n} alternation(s), per layer"
                                                          for n in args.iters) + " | LoftQ extra load, whole model |",
           "|---|---|" + "---|" * len(args.iters) + "---|")
    for name in args.model.split(","):
        config = model_config(name)
        key = jax.random.key(0)
        weights = [(0.02 * jax.random.normal(jax.random.fold_in(key, i), shape)).astype(jnp.bfloat16)
                   for i, shape in enumerate(config.linear_shapes().values())]
        plain = sum(median_seconds(lambda w=w: quantize(w, "nf4", 64, True).packed, args.repeats) for w in weights)
        fitted = [sum(median_seconds(lambda w=w, n=n: loftq(w, quant, args.rank, 2.0, n)[1], args.repeats)
                      for w in weights) for n in args.iters]
        extra = (fitted[0] - plain) * config.num_hidden_layers
        report(f"| {name} | {plain:.3f} s | " + " | ".join(f"{t:.3f} s" for t in fitted)
               + f" | {extra:.0f} s ({args.iters[0]} alternation) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
