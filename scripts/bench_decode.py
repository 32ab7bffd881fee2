"""Prompt processing and decoding speed of ``generate`` (KV cache), 4-bit against a bf16 base.

    python scripts/bench_decode.py [--model tinyllama-1.1b|llama-7b|tiny] [--batch 1,8] [--out FILE]

Random-weight models of ``qlora_jax.memory``'s presets (no download). Variants: ``nf4``
(NF4 + double quant, ``quant.kernel: auto``: the split-K Pallas kernel on GPU, XLA
elsewhere), ``nf4-xla`` (XLA dequantize + dot, GPU only: the kernel's comparison) and
``bf16`` (unquantized base). For each batch size: ``--prompt-len`` prompt tokens, then
``--new-tokens`` greedy tokens through ``qlora_jax.generate.generate_ids`` (one jitted
call: prefill, then a ``lax.scan`` over decode steps). Prefill time is the median of a
call that makes one token; decode tokens/s is ``batch x new_tokens`` over the median
time of the full call minus prefill. "weights MiB" is what every decode step reads.
"""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from bench_common import RANDOM_MODELS, Report, fail, int_list, median_seconds
from flax import nnx

from qlora_jax.config import QuantConfig
from qlora_jax.generate import Sampling, generate_ids
from qlora_jax.loading import random_model

VARIANTS = {"nf4": QuantConfig("nf4", 64, True, kernel="auto"), "nf4-xla": QuantConfig("nf4", 64, True, kernel="xla"),
            "bf16": QuantConfig("none")}
GREEDY = Sampling(temperature=0.0, seed=0)


def measure(model, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict[str, float]:
    ids = jax.random.randint(jax.random.key(batch), (batch, prompt_len), 0, model.config.vocab_size, jnp.int32)
    mask = jnp.ones_like(ids, bool)
    prefill = median_seconds(lambda: generate_ids(model, ids, mask, max_new_tokens=1, sampling=GREEDY), repeats)
    full = median_seconds(lambda: generate_ids(model, ids, mask, max_new_tokens=new_tokens + 1, sampling=GREEDY),
                          repeats)
    decode = full - prefill  # <= 0 only when the timing noise exceeds the decode time (tiny models)
    return {"prefill_tokens_per_second": batch * prompt_len / prefill,
            "decode_tokens_per_second": batch * new_tokens / decode if decode > 0 else None,
            "ms_per_token": 1e3 * decode / new_tokens if decode > 0 else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = jax.default_backend() == "gpu"
    parser.add_argument("--model", choices=tuple(RANDOM_MODELS), default="tinyllama-1.1b")
    parser.add_argument("--variants", default="nf4,nf4-xla,bf16" if on_gpu else "nf4,bf16",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--batch", type=int_list, default=(1, 8), help="batch sizes, comma-separated")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the table (markdown) to this file, line by line")
    args = parser.parse_args()
    names = [v.strip() for v in args.variants.split(",")]
    if not set(names) <= set(VARIANTS):
        return fail(f"--variants {args.variants!r}: expected a comma-separated list of {', '.join(VARIANTS)}")
    compute_dtype = jnp.bfloat16 if on_gpu else jnp.float32
    report = Report(args.out)
    report(f"# Decoding on {jax.devices()[0].device_kind}", "",
           f"jax {jax.__version__}; random {args.model}; {jnp.dtype(compute_dtype).name} compute; prompt "
           f"{args.prompt_len} tokens, {args.new_tokens} greedy tokens; median of {args.repeats}; "
           f"`python scripts/bench_decode.py {' '.join(sys.argv[1:])}`", "",
           "| variant | weights MiB | batch | prefill tokens/s | decode tokens/s | ms / decode step |",
           "|---|---|---|---|---|---|")
    for name in names:
        model = random_model(RANDOM_MODELS[args.model], quant=VARIANTS[name], compute_dtype=compute_dtype)
        weight_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model)))
        for batch in args.batch:
            r = measure(model, batch, args.prompt_len, args.new_tokens, args.repeats)
            decode = ("n/a | n/a" if r["ms_per_token"] is None
                      else f"{r['decode_tokens_per_second']:.1f} | {r['ms_per_token']:.2f}")
            report(f"| {name} | {weight_bytes / 2**20:.1f} | {batch} | {r['prefill_tokens_per_second']:.0f} "
                   f"| {decode} |")
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
