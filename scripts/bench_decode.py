"""Prompt processing and decoding speed of ``generate`` (KV cache), 4-bit against a bf16 base.

    python scripts/bench_decode.py [--model smollm2|tinyllama-1.1b|llama-7b|tiny] [--batch 1,8] [--out FILE]
    python scripts/bench_decode.py --model smollm2 --peer [--llama-cpp] [--out FILE]   # next to transformers, llama.cpp

``smollm2``: the real SmolLM2-135M-Instruct; the others are random-weight models of
``qlora_jax.memory``'s presets (no download). ``--peer`` runs transformers on the same
model in a second process (``scripts/peer_worker.py``, torch on 1 thread), interleaved with
ours row by row: ``nf4`` against transformers + bitsandbytes NF4 (+ double quant, f32
compute), ``bf16`` against transformers in bf16; the load average before and after is
stated. The memory-bandwidth bound of a decode step is the weights it reads over the
device's read bandwidth (summing a 1 GiB array: numpy on CPU, jax on a GPU). ``--llama-cpp`` adds llama.cpp
(``llama-cpp-python``, built from source: no wheel on PyPI for Linux) on the GGUF the model
ships as (Q4_1, 2 threads, batch 1), the CPU decoding anchor. Variants: ``nf4``
(NF4 + double quant, ``quant.kernel: auto``: on a GPU the Pallas kernels where XLA would tile, which
is every decode step, else XLA), ``nf4-xla`` and ``nf4-pallas`` (one kernel for every product; pallas on
GPU only) and
``bf16`` (unquantized base). For each batch size: ``--prompt-len`` prompt tokens, then
``--new-tokens`` greedy tokens through ``qlora_jax.generate.generate_ids`` (one jitted
call: prefill, then a ``lax.scan`` over decode steps). Prefill time is the median of a
call that makes one token; decode tokens/s is ``batch x new_tokens`` over the median
time of the full call minus prefill. "weights MiB" is what every decode step reads.
"""

import argparse
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import RANDOM_MODELS, Peer, Report, fail, int_list, median_seconds
from flax import nnx

from qlora_jax import assets
from qlora_jax.config import QuantConfig
from qlora_jax.generate import Sampling, generate_ids
from qlora_jax.loading import load_model, random_model

VARIANTS = {"nf4": QuantConfig("nf4", 64, True, kernel="auto"),
            "nf4-xla": QuantConfig("nf4", 64, True, kernel="xla"),
            "nf4-pallas": QuantConfig("nf4", 64, True, kernel="pallas"),
            "bf16": QuantConfig("none")}
GREEDY = Sampling(temperature=0.0, seed=0)
PEER_VARIANT = {"nf4": "bnb-nf4", "bf16": "bf16"}


def peer_decode(peer: Peer, variant: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """The transformers counterpart of ``measure``, from the peer process."""
    result = peer.ask(op="decode", variant=PEER_VARIANT[variant], batch=batch, prompt_len=prompt_len,
                      new_tokens=new_tokens, repeats=repeats)
    return {"prefill_tokens_per_second": batch * prompt_len / result["prefill_seconds"],
            "decode_tokens_per_second": batch * new_tokens / result["decode_seconds"],
            "ms_per_token": 1e3 * result["decode_seconds"] / new_tokens, "weights_bytes": result["weights_bytes"]}


def llama_cpp_row(prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """llama.cpp on the same model as shipped (SmolLM2 Q4_1 GGUF), batch 1, greedy, through llama-cpp-python."""
    from llama_cpp import Llama

    gguf = assets.smollm2_gguf()
    context = prompt_len + new_tokens + 8  # n_batch = n_ctx: scores are kept for every position
    model = Llama(model_path=str(gguf), n_ctx=context, n_batch=context, n_threads=2, verbose=False)
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, model.n_vocab(), prompt_len)]

    def run(count: int) -> None:
        model.reset()
        model.eval(prompt)
        for _ in range(count - 1):
            model.eval([int(np.argmax(model.scores[model.n_tokens - 1]))])

    prefill = median_seconds(lambda: run(1), repeats)
    full = median_seconds(lambda: run(new_tokens + 1), repeats)
    decode = full - prefill
    return {"prefill_tokens_per_second": prompt_len / prefill, "decode_tokens_per_second": new_tokens / decode,
            "ms_per_token": 1e3 * decode / new_tokens, "weights_bytes": gguf.stat().st_size}


def read_bandwidth() -> float:
    """Bytes/s the device reads (median of 5 sums of a 1 GiB float32 array: numpy's on CPU, jax's on a GPU)."""
    array = (jnp if jax.default_backend() == "gpu" else np).ones(2**28, np.float32)
    return array.nbytes / median_seconds(array.sum, 5)


def build_model(name: str, quant: QuantConfig, compute_dtype):
    if name == "smollm2":
        return load_model(assets.prepared_smollm2(), quant=quant, compute_dtype=compute_dtype)
    return random_model(RANDOM_MODELS[name], quant=quant, compute_dtype=compute_dtype)


def _row(label: str, weight_bytes: int, batch: int, r: dict, bandwidth: float, ratio: str = "") -> str:
    decode = ("n/a | n/a" if r["ms_per_token"] is None
              else f"{r['decode_tokens_per_second']:.1f} | {r['ms_per_token']:.2f}")
    bound = bandwidth / weight_bytes * batch
    return (f"| {label} | {weight_bytes / 2**20:.1f} | {batch} | {r['prefill_tokens_per_second']:.0f} | {decode} "
            f"| {bound:.0f} |{ratio}")


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
    parser.add_argument("--model", choices=("smollm2", *RANDOM_MODELS), default="tinyllama-1.1b")
    parser.add_argument("--compute-dtype",
                        help="float32, bfloat16, or both comma-separated (rows per dtype, one after the other); "
                             "default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="also time llama.cpp (llama-cpp-python, 2 threads) on the wheel's Q4_1 GGUF, batch 1")
    parser.add_argument("--peer", action="store_true",
                        help="also run transformers (bf16, bitsandbytes NF4) on the same model, interleaved")
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
    if "nf4-pallas" in names and not on_gpu:
        return fail("nf4-pallas needs a CUDA GPU (on CPU the kernels only run interpreted, in tests)")
    if args.peer and (args.model != "smollm2" or not set(names) <= set(PEER_VARIANT)):
        return fail("--peer compares the real model: use --model smollm2 and --variants from nf4, bf16")
    dtype_names = args.compute_dtype.split(",") if args.compute_dtype else ["bfloat16" if on_gpu else "float32"]
    if not set(dtype_names) <= {"float32", "bfloat16"} or len(set(dtype_names)) != len(dtype_names):
        return fail(f"--compute-dtype {args.compute_dtype!r}: expected float32, bfloat16 or both, comma-separated")
    if args.peer and len(dtype_names) > 1:
        return fail("--peer compares one compute dtype at a time")
    compute_dtypes = [jnp.dtype(name) for name in dtype_names]
    bandwidth = read_bandwidth()
    peer = Peer(assets.prepared_smollm2()) if args.peer else None
    load_before = os.getloadavg()
    report = Report(args.out)
    report(f"# Decoding on {jax.devices()[0].device_kind}", "",
           f"jax {jax.__version__} ({os.cpu_count()} CPU cores); {args.model}"
           f"{'' if args.model == 'smollm2' else ' (random weights)'}; {' and '.join(dtype_names)} compute; "
           f"prompt {args.prompt_len} tokens, {args.new_tokens} greedy tokens; median of {args.repeats}"
           + (f"; peer: transformers + torch {peer.info['torch']} on {peer.info['threads']} thread, in its own "
              f"process, interleaved row by row" if peer else "")
           + f"; load average {load_before[0]:.2f} at the start; memory read bandwidth {bandwidth / 1e9:.1f} GB/s; "
           f"`python scripts/bench_decode.py {' '.join(sys.argv[1:])}`", "",
           "| variant | weights MiB | batch | prefill tokens/s | decode tokens/s | ms / decode step "
           "| bandwidth bound, tokens/s |" + (" ours / peer, decode |" if peer else ""),
           "|---|---|---|---|---|---|---|" + ("---|" if peer else ""))
    for name, compute_dtype in [(name, dtype) for name in names for dtype in compute_dtypes]:
        model = build_model(args.model, VARIANTS[name], compute_dtype)
        weight_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model)))
        label = f"ours {name}" if peer else name if len(compute_dtypes) == 1 else f"{name}, {compute_dtype.name}"
        for batch in args.batch:
            r = measure(model, batch, args.prompt_len, args.new_tokens, args.repeats)
            report(_row(label, weight_bytes, batch, r, bandwidth, " |" if peer else ""))
            if peer:
                p = peer_decode(peer, name, batch, args.prompt_len, args.new_tokens, args.repeats)
                ratio = (f" {r['decode_tokens_per_second'] / p['decode_tokens_per_second']:.2f}x |"
                         if r["decode_tokens_per_second"] else " n/a |")
                report(_row(f"transformers {PEER_VARIANT[name]}", p["weights_bytes"], batch, p, bandwidth, ratio))
        del model
    if peer:
        peer.close()
    if args.llama_cpp:
        r = llama_cpp_row(args.prompt_len, args.new_tokens, args.repeats)
        report(_row("llama.cpp Q4_1 (GGUF file), 2 threads", r["weights_bytes"], 1, r, bandwidth, " |" if peer else ""))
    report("", f"Load average at the end: {os.getloadavg()[0]:.2f}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
