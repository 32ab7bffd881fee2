"""QLoRA on SmolLM2-135M, ours against transformers + peft + bitsandbytes, interleaved step by step.

    python scripts/bench_peer.py [--steps 6] [--out benchmarks/results/bench_peer_cpu.md]

The setup of issue 15's table: SmolLM2-135M-Instruct, NF4 + double quant, LoRA r=16 (alpha
32, dropout 0.05) on all 7 projections, per-layer gradient checkpointing, AdamW (lr 1e-4),
batch 4 x 128 tokens (the same token batches for every system), loss on every token.
Ours runs in this process (JAX on the machine's cores), the peer in its own
(``scripts/peer_worker.py``: PEFT's QLoRA recipe, torch on 1 thread, the fair setting on a
shared 2-core machine). The systems alternate: our f32 step, our bf16-compute step (each twice: 4-bit
decode through the C++ CPU kernel of ``quant.cpu_kernel``, and through the XLA path with
``QLORA_JAX_CPU_KERNEL=off`` while that system compiles), the peer's step, repeated
``--steps`` times after one warm-up step each (ours compiles there).
Reported: median step seconds, tokens/s, the ratio to the peer, and the loss after the last
step (equal batches, equal updates: the f32 and bf16 losses show what bf16 compute costs);
load + quantize seconds; greedy decode tokens/s at batch 1 (128-token prompt, 64 new
tokens), for ours with both decode paths. The load average is stated before and after.
"""

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import Peer, Report, median_seconds
from flax import nnx

from qlora_jax import assets
from qlora_jax.config import LoraConfig, OptimConfig, QuantConfig
from qlora_jax.generate import Sampling, generate_ids
from qlora_jax.loading import load_model
from qlora_jax.lora import LoRAParam
from qlora_jax.train import make_train_step

LORA = LoraConfig(rank=16, alpha=32, dropout=0.05)
QUANT = QuantConfig("nf4", 64, True, kernel="xla")
BATCH, SEQ_LEN, LR = 4, 128, 1e-4


@contextlib.contextmanager
def decode_path(cpu_kernel: bool):
    """Trace 4-bit decodes through the C++ CPU kernel, or through the XLA path (``QLORA_JAX_CPU_KERNEL``)."""
    before = os.environ.get("QLORA_JAX_CPU_KERNEL")
    os.environ["QLORA_JAX_CPU_KERNEL"] = "on" if cpu_kernel else "off"
    try:
        yield
    finally:
        os.environ.pop("QLORA_JAX_CPU_KERNEL")
        if before is not None:
            os.environ["QLORA_JAX_CPU_KERNEL"] = before


class Ours:
    """Our QLoRA step on the same model, data and settings, with ``compute_dtype``, decoding 4-bit weights
    through the CPU kernel or the XLA path (``cpu_kernel``)."""

    def __init__(self, model_dir: Path, compute_dtype, cpu_kernel: bool):
        self.cpu_kernel = cpu_kernel
        start = time.perf_counter()
        model = load_model(model_dir, quant=QUANT, lora=LORA, compute_dtype=compute_dtype, remat="layer")
        jax.block_until_ready(nnx.state(model))
        self.load_seconds = time.perf_counter() - start
        self.graphdef, self.lora, self.frozen = nnx.split(model, LoRAParam, ...)
        tx, _ = OptimConfig(lr=LR, schedule="constant", weight_decay=0.0, max_grad_norm=0.0).build(1000)
        self.opt_state = tx.init(self.lora)
        self.step_fn = make_train_step(self.graphdef, tx, donate=False, loss_chunk=128)
        self.count = 0

    def step(self, ids: np.ndarray) -> dict:
        batch = {"input_ids": jnp.asarray(ids)[None], "attention_mask": jnp.ones((1, *ids.shape), jnp.int32),
                 "labels": jnp.asarray(ids)[None]}
        start = time.perf_counter()
        with decode_path(self.cpu_kernel):  # read when the step compiles, at its first call
            self.lora, self.opt_state, metrics = self.step_fn(self.lora, self.opt_state, self.frozen, batch,
                                                              jax.random.key(self.count))
        loss = float(metrics["loss"])
        self.count += 1
        return {"seconds": time.perf_counter() - start, "loss": loss}

    def decode_tokens_per_second(self, prompt_len: int = 128, new_tokens: int = 64) -> float:
        model = nnx.merge(self.graphdef, self.lora, self.frozen)
        ids = jnp.asarray(np.random.default_rng(1).integers(0, model.config.vocab_size, (1, prompt_len)), jnp.int32)
        mask = jnp.ones_like(ids, bool)
        greedy = Sampling()
        jax.clear_caches()  # the other decode path's compiled programs have the same signature
        with decode_path(self.cpu_kernel):
            prefill = median_seconds(lambda: generate_ids(model, ids, mask, max_new_tokens=1, sampling=greedy), 3)
            full = median_seconds(
                lambda: generate_ids(model, ids, mask, max_new_tokens=new_tokens + 1, sampling=greedy), 3)
        return new_tokens / (full - prefill)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model_dir = assets.prepared_smollm2()
    load_before = os.getloadavg()
    peer = Peer(model_dir)
    peer_load = peer.ask(op="load_qlora", rank=LORA.rank, alpha=LORA.alpha, dropout=LORA.dropout, lr=LR)["seconds"]
    ours = {"ours f32": Ours(model_dir, jnp.float32, True),
            "ours f32, XLA decode": Ours(model_dir, jnp.float32, False),
            "ours bf16 compute": Ours(model_dir, jnp.bfloat16, True),
            "ours bf16 compute, XLA decode": Ours(model_dir, jnp.bfloat16, False)}
    rng = np.random.default_rng(0)
    vocab = nnx.merge(ours["ours f32"].graphdef, ours["ours f32"].lora, ours["ours f32"].frozen).config.vocab_size
    batches = [rng.integers(0, vocab, (BATCH, SEQ_LEN)).astype(np.int32) for _ in range(args.steps + 1)]
    results = {name: [] for name in [*ours, "transformers + peft + bnb"]}
    for ids in batches:  # the first round warms up (and compiles ours); the systems alternate step by step
        for name, system in ours.items():
            results[name].append(system.step(ids))
        results["transformers + peft + bnb"].append(peer.ask(op="train_step", input_ids=ids.tolist()))
    peer_decode = peer.ask(op="decode", variant="bnb-nf4", batch=1, prompt_len=128, new_tokens=64, repeats=3)
    peer.close()
    decode = {name: ours[name].decode_tokens_per_second() for name in ("ours f32", "ours f32, XLA decode")}
    decode["transformers + peft + bnb"] = 64 / peer_decode["decode_seconds"]
    load_after = os.getloadavg()
    peer_seconds = statistics.median(r["seconds"] for r in results["transformers + peft + bnb"][1:])
    report = Report(args.out)
    report("# QLoRA train step, ours vs transformers + peft + bitsandbytes (CPU)", "",
           f"SmolLM2-135M-Instruct, NF4 + double quant, LoRA r=16 on all 7 projections, per-layer checkpointing, "
           f"AdamW, batch {BATCH} x {SEQ_LEN}; median of {args.steps} interleaved steps after one warm-up each; "
           "4-bit decode through our C++ CPU kernel, or through the XLA path (`XLA decode`). "
           f"jax {jax.__version__} on {os.cpu_count()} cores (XLA's default threads); torch {peer.info['torch']} "
           f"on {peer.info['threads']} thread. Load average {load_before[0]:.2f} before, {load_after[0]:.2f} after. "
           f"`python scripts/bench_peer.py {' '.join(sys.argv[1:])}`", "",
           "| system | step s | tokens/s | step time vs peer | loss after the last step | load + quantize s "
           "| decode tokens/s (batch 1) |", "|---|---|---|---|---|---|---|")
    loads = {name: system.load_seconds for name, system in ours.items()}
    loads["transformers + peft + bnb"] = peer_load
    for name, steps in results.items():
        seconds = statistics.median(r["seconds"] for r in steps[1:])
        report(f"| {name} | {seconds:.2f} | {BATCH * SEQ_LEN / seconds:.0f} | {seconds / peer_seconds:.2f}x "
               f"| {steps[-1]['loss']:.4f} | {loads[name]:.1f} | "
               + (f"{decode[name]:.1f} |" if name in decode else "n/a |"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
