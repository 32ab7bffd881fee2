"""Write transformers' greedy continuations of the tiny fixture models (needs the ``oracle`` extra).

    python scripts/make_generation_fixtures.py

For each checkpoint in tests/fixtures/models written by make_model_fixtures.py, a
left-padded batch of three prompts of different lengths is continued greedily for 12
tokens by ``model.generate(do_sample=False)`` in float32; the prompts, mask and new
tokens go to tests/fixtures/models/greedy_reference.json.
"""

import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models"
VARIANTS = ("llama3_rope", "mistral_window", "qwen2_bias_tied", "llama_headdim_linear")
NEW_TOKENS = 12


def main() -> None:
    rng = np.random.default_rng(7)
    lengths = (9, 4, 6)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = rng.integers(3, 256, length)
        mask[row, width - length:] = 1
    reference = {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "new_tokens": {}}
    for name in VARIANTS:
        model = AutoModelForCausalLM.from_pretrained(OUT / name, dtype=torch.float32, attn_implementation="eager")
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = None  # all NEW_TOKENS steps, argmax every time (EOS included)
        with torch.no_grad():
            out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                                 max_new_tokens=NEW_TOKENS)
        reference["new_tokens"][name] = out[:, width:].tolist()
    (OUT / "greedy_reference.json").write_text(json.dumps(reference))


if __name__ == "__main__":
    main()
