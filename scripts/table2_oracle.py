"""The data-type table's perplexities from transformers + bitsandbytes, next to ours (needs the ``oracle`` extra).

    python scripts/table2_oracle.py [--out benchmarks/results/table2_oracle_cpu.md]

The same token sequences as ``scripts/reproduce_paper.py`` (content tokens of the held-out
Chit-Chat conversations, 6 x 256 tokens of *Botchan*, every token of the conversations), scored
by transformers in float32 on the converted SmolLM2 directory: unquantized, and quantized by
bitsandbytes at its blocksize 64 (NF4 + double quant, NF4, FP4; bnb has no Int4). bnb runs in
train mode: its plain dequantize + matmul path (its eval path on CPU repacks the weights).
"""

import argparse
import math
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from bench_common import Report
from reproduce_paper import DATA_TYPES, held_out, measures, perplexity
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qlora_jax import assets
from qlora_jax.config import QuantConfig
from qlora_jax.config_io import load_run_config
from qlora_jax.data import IGNORE
from qlora_jax.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
MEASURES = ("content", "prose", "all")


@torch.no_grad()
def torch_perplexity(model, sequences) -> float:
    total, count = 0.0, 0
    for ids, labels in sequences:
        logits = model(input_ids=torch.from_numpy(np.asarray(ids, np.int64))[None]).logits[0, :-1].float()
        targets = torch.from_numpy(np.asarray(labels[1:], np.int64))
        scored = targets != IGNORE
        losses = torch.nn.functional.cross_entropy(logits[scored], targets[scored], reduction="sum")
        total, count = total + float(losses), count + int(scored.sum())
    return math.exp(total / count)


def torch_model(model_dir: Path, quant: str, double_quant: bool):
    if quant == "none":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=double_quant,
                             bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.float32,
                                                device_map="cpu").train()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_run_config(ROOT / "configs" / "default.yaml")
    examples, tokenizer = held_out(config)
    sequences = measures(examples, tokenizer, config.data)
    model_dir = assets.prepared_smollm2()
    report = Report(args.out)
    report(f"# Data-type table: qlora_jax vs transformers {transformers.__version__} + bitsandbytes, perplexity", "",
           "`python scripts/table2_oracle.py` (same sequences as scripts/reproduce_paper.py; fp32 compute)", "",
           "| data type | measure | qlora_jax | transformers (+ bnb) | relative difference |", "|---|---|---|---|---|")
    for label, quant, double_quant in DATA_TYPES:
        if quant == "int4":
            continue
        ours = load_model(model_dir, quant=QuantConfig(quant, 64, double_quant), compute_dtype=jnp.float32)
        theirs = torch_model(model_dir, quant, double_quant)
        for measure in MEASURES:
            a, b = perplexity(ours, sequences[measure]), torch_perplexity(theirs, sequences[measure])
            report(f"| {label} | {measure} | {a:.4f} | {b:.4f} | {100 * (a - b) / b:+.4f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
