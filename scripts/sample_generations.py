"""Greedy replies of the base model and of the fine-tuned adapter to the same chat prompts.

    python scripts/sample_generations.py --run runs/default

Reads the run's config and adapter; prints a markdown table (prompt, before, after).
"""

import argparse
import json
from pathlib import Path

from qlora_jax.config_io import load_run_config
from qlora_jax.generate import generate
from qlora_jax.loading import load_model
from qlora_jax.model_source import compute_dtype, resolve_model_dir
from qlora_jax.peft import load_peft_adapter
from qlora_jax.tokenizer import load_tokenizer

PROMPTS = ["Hey! How was your weekend?", "What do you like to do when it rains?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/default"))
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    config = load_run_config(args.run / "config.yaml")
    model_dir = resolve_model_dir(config.model.path, config.model.revision)
    q = config.quant
    dtype = compute_dtype(config.model.compute_dtype, training=False, quantized=q.quantized)
    model = load_model(model_dir, quant=q, lora=config.lora, compute_dtype=dtype)
    tokenizer = load_tokenizer(model_dir)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
               for p in PROMPTS]
    before = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens)  # lora_b = 0: the base
    load_peft_adapter(model, args.run / "adapter")
    after = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens)
    print(f"Greedy, {args.max_new_tokens} new tokens at most, {q.quant_type} base ({model_dir.name}), {dtype.name} "
          "compute.\n")
    print("| prompt | base model | after fine-tuning |\n|---|---|---|")
    for prompt, b, a in zip(PROMPTS, before, after, strict=True):
        print(f"| {prompt} | {json.dumps(b)[1:-1]} | {json.dumps(a)[1:-1]} |")


if __name__ == "__main__":
    main()
