"""PEFT's LoftQ and DoRA on the tiny llama3_rope fixture, as oracles for ours (needs the ``oracle`` extra).

    python scripts/make_loftq_dora_fixtures.py

Writes into tests/fixtures/models/:
- ``llama3_rope_peft_dora/``: a PEFT ``use_dora=True`` adapter (r=4, alpha=8, all 7 projections,
  random B and magnitudes) on the fp32 base, and ``llama3_rope_ours_dora/``: one written by our
  ``save_peft_adapter`` (random values from numpy's generator 7);
- ``llama3_rope_peft_loftq/``: PEFT's ``replace_lora_weights_loftq`` on the transformers +
  bitsandbytes NF4 + double-quant base (r=4, alpha=4, all 7 projections);
- ``loftq_dora.npz``: PEFT's logits of the three adapted models on the fixture's right-padded
  batch, and PEFT's ``loftq_init`` (NF4, 3 iterations, r=4) of two weights of layer 0.

PEFT runs LoftQ's SVD on a hard-coded "cuda" (or "xpu") device; this CPU-only script maps those
device moves to the CPU, which changes no arithmetic.
"""

import contextlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import peft
import torch
from flax import nnx
from peft.utils import loftq_utils
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qlora_jax.config import LORA_TARGETS, LoraConfig, QuantConfig
from qlora_jax.loading import load_model
from qlora_jax.peft import save_peft_adapter

MODELS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models"
BASE = MODELS / "llama3_rope"
LOFTQ_WEIGHTS = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight")


@contextlib.contextmanager
def accelerators_on_cpu():
    """Tensor moves to "cuda"/"xpu" stay on the CPU (PEFT's LoftQ code names those devices)."""
    original = torch.Tensor.to

    def on_cpu(device):
        accelerator = device in ("cuda", "xpu") or (isinstance(device, torch.device) and device.type in ("cuda", "xpu"))
        return "cpu" if accelerator else device

    def to(self, *args, **kwargs):
        args = tuple(on_cpu(a) for a in args)
        if "device" in kwargs:
            kwargs["device"] = on_cpu(kwargs["device"])
        return original(self, *args, **kwargs)

    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.to = original


@torch.no_grad()
def logits_of(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    mask_t = torch.from_numpy(mask)
    positions = (mask_t.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=torch.from_numpy(ids), attention_mask=mask_t, position_ids=positions).logits.numpy()


def fp32_base():
    return AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32, attn_implementation="eager")


def peft_dora(batch) -> np.ndarray:
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                             use_dora=True, task_type="CAUSAL_LM")
    model = peft.get_peft_model(fp32_base(), config)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.2)
        elif "lora_magnitude_vector" in name:
            param.data.mul_(1.0 + 0.2 * torch.randn_like(param))
    model.eval()
    model.save_pretrained(MODELS / "llama3_rope_peft_dora")
    return logits_of(model, *batch)


def ours_dora(batch) -> np.ndarray:
    lora = LoraConfig(rank=4, alpha=8, dropout=0.0, dora=True)
    model = load_model(BASE, quant=QuantConfig("none"), lora=lora, compute_dtype=jnp.float32)
    rng = np.random.default_rng(7)
    for _, module in nnx.iter_graph(model.layers):
        if getattr(module, "lora", None) is not None:
            for param, scale in ((module.lora_a, 0.2), (module.lora_b, 0.2)):
                param.set_value(jnp.asarray(rng.normal(0, scale, param.get_value().shape), jnp.float32))
            magnitude = module.lora_magnitude.get_value()
            module.lora_magnitude.set_value(magnitude * jnp.asarray(1 + 0.2 * rng.normal(size=magnitude.shape),
                                                                    jnp.float32))
    save_peft_adapter(model, MODELS / "llama3_rope_ours_dora", str(BASE))
    loaded = peft.PeftModel.from_pretrained(fp32_base(), MODELS / "llama3_rope_ours_dora").eval()
    return logits_of(loaded, *batch)


def peft_loftq(batch) -> np.ndarray:
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(BASE, quantization_config=bnb, dtype=torch.float32, device_map="cpu",
                                                attn_implementation="eager")
    config = peft.LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, config)
    with accelerators_on_cpu():
        peft.replace_lora_weights_loftq(model, model_path=str(BASE / "model.safetensors"))
    model.train()  # bnb's plain dequantize + matmul path, as make_model_fixtures.py measures the NF4 base
    model.save_pretrained(MODELS / "llama3_rope_peft_loftq")
    return logits_of(model, *batch)


def peft_loftq_iterations() -> dict:
    from safetensors.torch import load_file

    weights = load_file(BASE / "model.safetensors")
    arrays = {}
    for name in LOFTQ_WEIGHTS:
        with accelerators_on_cpu():
            dequantized, lora_a, lora_b = loftq_utils.loftq_init(weights[name], num_bits=4, reduced_rank=4,
                                                                 num_iter=3)
        arrays.update({f"loftq3/{name}/weight": weights[name].float().numpy(),
                       f"loftq3/{name}/dequantized": dequantized.float().numpy(),
                       f"loftq3/{name}/lora_a": lora_a.numpy(), f"loftq3/{name}/lora_b": lora_b.numpy()})
    return arrays


def main() -> None:
    torch.manual_seed(0)
    reference = np.load(MODELS / "reference_logits.npz")
    batch = (reference["right_ids"], reference["right_mask"])
    arrays = {"peft_dora/right_logits": peft_dora(batch), "ours_dora/right_logits": ours_dora(batch),
              "peft_loftq/right_logits": peft_loftq(batch), **peft_loftq_iterations()}
    np.savez_compressed(MODELS / "loftq_dora.npz", **arrays)
    print(f"wrote {sorted(arrays)} (peft {peft.__version__})")


if __name__ == "__main__":
    main()
