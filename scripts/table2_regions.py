"""Where all-token perplexity of the held-out chats comes from: system prompt, template markup, content.

    python scripts/table2_regions.py [--out benchmarks/results/table2_regions_cpu.md]

SmolLM2's chat template puts one fixed system prompt into every conversation that has none.
Every token of the rendered held-out conversations (``scripts/reproduce_paper.py``) is put in
one region: the system prompt's text, the content of a message (``Encoder.content``), or the
template's markup (``<|im_start|>``, role names, ``<|im_end|>``, newlines). Prints each
region's share of the predicted tokens and its perplexity per data type (fp32 compute).
"""

import argparse
import math
import re
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from bench_common import Report
from reproduce_paper import DATA_TYPES, held_out, predicted_counts

from qlora_jax import assets
from qlora_jax.config import QuantConfig
from qlora_jax.config_io import load_run_config
from qlora_jax.data import IGNORE, Encoder
from qlora_jax.evaluate import score_tokens
from qlora_jax.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S)


def regions(examples, tokenizer, data_config) -> dict[str, list]:
    """``(ids, labels)`` per region, labels set on that region's tokens only."""
    encoder = Encoder(tokenizer, data_config)
    out = {"system prompt": [], "content": [], "markup": []}
    for example in examples:
        content = encoder.content(example.messages)
        text = tokenizer.apply_chat_template(example.messages)
        ids, offsets = tokenizer.encode_with_offsets(text)
        ids, offsets = np.asarray(ids[: len(example.input_ids)], np.int32), offsets[: len(example.input_ids)]
        assert np.array_equal(ids, example.input_ids), "the rendering differs from the held-out example's"
        match = SYSTEM.search(text)
        system = np.zeros(len(ids), bool)
        if match:
            system = (offsets[:, 0] >= match.start(1)) & (offsets[:, 1] <= match.end(1))
        in_content = content.labels != IGNORE
        for name, mask in (("system prompt", system), ("content", in_content), ("markup", ~system & ~in_content)):
            out[name].append((ids, np.where(mask, ids, IGNORE).astype(np.int32)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    config = load_run_config(ROOT / "configs" / "default.yaml")
    examples, tokenizer = held_out(config)
    parts = regions(examples, tokenizer, config.data)
    counts = predicted_counts(parts)
    total = sum(counts.values())
    report = Report(args.out)
    report("# All-token perplexity of the held-out chats, by region", "",
           f"`python scripts/table2_regions.py`: {len(examples)} conversations, {total} predicted tokens", "",
           "| data type | " + " | ".join(f"{name} ({counts[name]} tokens, {100 * counts[name] / total:.1f}%)"
                                       for name in parts) + " |", "|---|" + "---|" * len(parts))
    for label, quant, double_quant in DATA_TYPES:
        model = load_model(assets.prepared_smollm2(), quant=QuantConfig(quant, 64, double_quant),
                           compute_dtype=jnp.float32)
        values = []
        for seqs in parts.values():
            scores = [score_tokens(model, ids, labels) for ids, labels in seqs]
            values.append(math.exp(sum(s for s, _ in scores) / sum(c for _, c in scores)))
        report(f"| {label} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
