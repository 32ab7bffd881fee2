"""Write tiny random LLaMA-family checkpoints and transformers' logits for them.

Needs the ``oracle`` extra (torch CPU, transformers, bitsandbytes). For each
variant this writes ``tests/fixtures/models/<variant>/`` (config.json +
model.safetensors in bf16, as ``save_pretrained`` writes them) and the fp32
logits transformers computes on a right- and a left-padded batch. One variant is
also quantized by transformers + bitsandbytes (NF4, double quant) and saved as a
pre-quantized checkpoint, with the logits of that quantized model.

    python scripts/make_model_fixtures.py
"""

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, MistralConfig, Qwen2Config

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "models"
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, rms_norm_eps=1e-5,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2, attention_dropout=0.0)


def variants() -> dict[str, transformers.PretrainedConfig]:
    return {
        "llama3_rope": LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 16}),
        "mistral_window": MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=1, sliding_window=6,
                                        tie_word_embeddings=False),
        "qwen2_bias_tied": Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=True),
        "llama_headdim_linear": LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                                            tie_word_embeddings=True,
                                            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                             "factor": 2.0}),
    }


def batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Two sequences of 12 tokens; the second has 8 real tokens, padded right and (separately) left."""
    ids = rng.integers(3, 256, (2, 12)).astype(np.int64)
    right_mask = np.ones((2, 12), np.int64)
    right_mask[1, 8:] = 0
    left_ids = ids.copy()
    left_ids[1] = np.concatenate([np.zeros(4, np.int64), ids[1, :8]])
    left_mask = np.ones((2, 12), np.int64)
    left_mask[1, :4] = 0
    return {"right_ids": ids, "right_mask": right_mask, "left_ids": left_ids, "left_mask": left_mask}


@torch.no_grad()
def logits_of(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    mask_t = torch.from_numpy(mask)
    positions = (mask_t.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=torch.from_numpy(ids), attention_mask=mask_t, position_ids=positions)
    return out.logits.float().numpy()


def make_peft_adapter(out: Path, name: str, arrays: dict) -> dict:
    """A PEFT LoRA adapter (r=4, q/v/down, random non-zero B) on ``name`` and the adapted fp32 logits."""
    import peft

    base = AutoModelForCausalLM.from_pretrained(out / name, dtype=torch.float32, attn_implementation="eager")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, config)
    for module_name, param in model.named_parameters():
        if "lora_B" in module_name:
            param.data.normal_(0.0, 0.2)
    model.eval()
    model.save_pretrained(out / f"{name}_peft_adapter")
    return {f"{name}_peft/{pad}_logits": logits_of(model, arrays[f"{pad}_ids"], arrays[f"{pad}_mask"])
            for pad in ("right", "left")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    if args.out.exists():
        shutil.rmtree(args.out)
    arrays = batch(rng)
    for name, config in variants().items():
        config._attn_implementation = "eager"
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
        for param in model.parameters():  # larger than the default init, so the test is sensitive
            param.data.normal_(0.0, 0.08 if param.dim() > 1 else 0.3).add_(1.0 if param.dim() == 1 else 0.0)
        model.save_pretrained(args.out / name, safe_serialization=True)
        fp32 = AutoModelForCausalLM.from_pretrained(args.out / name, dtype=torch.float32,
                                                    attn_implementation="eager").eval()
        for pad in ("right", "left"):
            arrays[f"{name}/{pad}_logits"] = logits_of(fp32, arrays[f"{pad}_ids"], arrays[f"{pad}_mask"])
    quantized_name = "llama3_rope"
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    q_model = AutoModelForCausalLM.from_pretrained(args.out / quantized_name, quantization_config=bnb,
                                                   dtype=torch.float32, device_map="cpu",
                                                   attn_implementation="eager")
    q_model.train()  # bnb's plain dequantize + matmul path (its eval path repacks weights for AVX512-BF16)
    for pad in ("right", "left"):
        arrays[f"{quantized_name}_nf4/{pad}_logits"] = logits_of(q_model, arrays[f"{pad}_ids"], arrays[f"{pad}_mask"])
    q_model.save_pretrained(args.out / f"{quantized_name}_bnb_nf4", safe_serialization=True)
    arrays.update(make_peft_adapter(args.out, quantized_name, arrays))
    np.savez_compressed(args.out / "reference_logits.npz", **arrays)
    print(f"wrote {sorted(p.name for p in args.out.iterdir())} (transformers {transformers.__version__})")


if __name__ == "__main__":
    main()
