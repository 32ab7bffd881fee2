"""Check our merged export with transformers and record its logits (needs the ``oracle`` extra).

    python scripts/make_export_fixtures.py

Exports tests/fixtures/models/llama3_rope + the PyTorch-PEFT adapter beside it with
``qlora_jax.export --merge`` (bf16 base, so the merge is exact up to one bf16 rounding),
loads the result with ``transformers.AutoModelForCausalLM`` in float32 and writes its
logits on the fixture's right-padded batch to tests/fixtures/models/merged_export_logits.npz.
"""

import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from qlora_jax.config import QuantConfig
from qlora_jax.export import export_merged

MODELS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models"


def main() -> None:
    reference = np.load(MODELS / "reference_logits.npz")
    with tempfile.TemporaryDirectory() as tmp:
        merged = export_merged(MODELS / "llama3_rope", MODELS / "llama3_rope_peft_adapter", Path(tmp) / "merged",
                               quant=QuantConfig("none"))
        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(reference["right_ids"]).long(),
                           attention_mask=torch.from_numpy(reference["right_mask"]).long()).logits
    np.savez_compressed(MODELS / "merged_export_logits.npz", right_logits=logits.numpy())


if __name__ == "__main__":
    main()
