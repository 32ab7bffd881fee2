"""Export: the merged bf16 model and the transformers + bitsandbytes 4-bit checkpoint."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES

from qlora_jax.config import QuantConfig
from qlora_jax.export import export_bnb, export_merged
from qlora_jax.export import main as export_main
from qlora_jax.loading import load_model
from qlora_jax.peft import load_peft_adapter, read_adapter_config

MODELS = FIXTURES / "models"


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_merged_export_gives_the_adapted_model_logits(quant, tmp_path):
    adapter = MODELS / "llama3_rope_peft_adapter"
    ours = load_model(MODELS / "llama3_rope", quant=quant, lora=read_adapter_config(adapter),
                      compute_dtype=jnp.float32)
    load_peft_adapter(ours, adapter)
    out = export_merged(MODELS / "llama3_rope", adapter, tmp_path / "merged", quant=QuantConfig(quant))
    assert not (tmp_path / "merged.partial").exists()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    merged = load_model(out, quant="none", compute_dtype=jnp.float32)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 12)), jnp.int32)
    expected, actual = np.asarray(ours(ids)), np.asarray(merged(ids))
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    assert error < 1e-2  # one bf16 rounding of each merged weight
    assert np.abs(np.asarray(merged(ids)) - np.asarray(load_model(MODELS / "llama3_rope", quant="none",
                                                                    compute_dtype=jnp.float32)(ids))).max() > 1e-3


def test_export_cli_errors(tmp_path, capsys):
    assert export_main(["--model", str(MODELS / "llama3_rope"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: --format bf16 needs --merge")
    assert export_main(["--model", str(tmp_path / "missing"), "--merge", "--out", str(tmp_path / "o")]) == 2
    assert "missing' is neither a directory, a Hugging Face repo id (owner/name) in the local cache, nor one of" \
        in capsys.readouterr().err
    assert export_main(["--model", str(MODELS / "llama3_rope"), "--format", "bnb-nf4", "--merge",
                        "--out", str(tmp_path / "o")]) == 2
    assert "--format bnb-nf4 writes the 4-bit base alone" in capsys.readouterr().err


def test_bnb_nf4_export_is_byte_identical_to_transformers_and_bitsandbytes(tmp_path):
    """tests/fixtures/models/llama3_rope_bnb_nf4 was written by transformers 5 + bitsandbytes 0.50.2
    (``save_pretrained`` of the llama3_rope model loaded in float32 with NF4 + double quant)."""
    out = export_bnb(MODELS / "llama3_rope", tmp_path / "bnb", "nf4", True, "float32")
    reference = MODELS / "llama3_rope_bnb_nf4"
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((reference / "config.json").read_text())
    assert load_model(out, quant="nf4").layer(0).self_attn.q_proj.quantized_weight().nbytes() > 0


def _merged_logits(adapter: str, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """(our fp32 logits of the merged bf16 export of llama3_rope + ``adapter``, which of them are real tokens)."""
    export_merged(MODELS / "llama3_rope", MODELS / adapter, out, QuantConfig("none"))
    reference = np.load(MODELS / "reference_logits.npz")
    ids, mask = jnp.asarray(reference["right_ids"]), jnp.asarray(reference["right_mask"])
    return np.asarray(load_model(out, quant="none", compute_dtype=jnp.float32)(ids, mask)), \
        reference["right_mask"].astype(bool)


def test_transformers_reads_the_merged_export_as_we_do(tmp_path):
    """merged_export_logits.npz: transformers' float32 logits of this export (scripts/make_export_fixtures.py)."""
    ours, real = _merged_logits("llama3_rope_peft_adapter", tmp_path / "merged")
    transformers_logits = np.load(MODELS / "merged_export_logits.npz")["right_logits"]
    assert np.abs(ours - transformers_logits)[real].max() < 1e-4  # the same file, read the same way
    peft = np.load(MODELS / "reference_logits.npz")["llama3_rope_peft/right_logits"]  # PEFT's, unmerged
    assert np.abs(transformers_logits - peft)[real].max() / np.abs(peft).max() < 1e-2  # one bf16 rounding


def test_merged_dora_export_gives_peft_dora_logits(tmp_path):
    """PEFT's unmerged DoRA logits (scripts/make_loftq_dora_fixtures.py) from our merged bf16 export."""
    ours, real = _merged_logits("llama3_rope_peft_dora", tmp_path / "merged")
    peft = np.load(MODELS / "loftq_dora.npz")["peft_dora/right_logits"]
    assert np.abs(ours - peft)[real].max() / np.abs(peft).max() < 1e-2  # one bf16 rounding
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
