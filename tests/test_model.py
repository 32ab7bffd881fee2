"""The NNX model against transformers' logits on tiny random checkpoints (fixtures)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES
from flax import nnx

from qlora_jax.config import LoraConfig, ModelConfig, QuantConfig
from qlora_jax.loading import load_model, random_model
from qlora_jax.lora import LoRAParam, QLoRALinear
from qlora_jax.model import KVCache

MODELS = FIXTURES / "models"
VARIANTS = ["llama3_rope", "mistral_window", "qwen2_bias_tied", "llama_headdim_linear"]
# fp32 on both sides, same bf16 weights: only summation order differs. Measured max |diff| 1.7e-6
# on logits of magnitude ~2.5 (x86 CPU, jax 0.10.2 vs torch 2.13.0).
FP32_TOLERANCE = 1e-4
# NF4: both sides decode the same bytes to the same f32 weights (tests/test_quant.py), so the
# tolerance stays the fp32 one; measured 1.3e-6.
NF4_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference():
    with np.load(MODELS / "reference_logits.npz") as data:
        return {k: data[k] for k in data.files}


def _max_error(model, reference, key, pad):
    ids, mask = jnp.asarray(reference[f"{pad}_ids"]), jnp.asarray(reference[f"{pad}_mask"])
    logits = np.asarray(model(ids, mask))
    real = reference[f"{pad}_mask"].astype(bool)
    return np.abs(logits - reference[f"{key}/{pad}_logits"])[real].max()


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers_fp32(reference, variant):
    model = load_model(MODELS / variant, quant="none", compute_dtype=jnp.float32)
    for pad in ("right", "left"):
        assert _max_error(model, reference, variant, pad) < FP32_TOLERANCE


@pytest.mark.parametrize("source", ["llama3_rope", "llama3_rope_bnb_nf4"])
def test_nf4_logits_match_transformers_bitsandbytes(reference, source):
    """Quantized by us from bf16, or loaded from transformers+bnb's own 4-bit checkpoint."""
    model = load_model(MODELS / source, quant="nf4", compute_dtype=jnp.float32)
    for pad in ("right", "left"):
        assert _max_error(model, reference, "llama3_rope_nf4", pad) < NF4_TOLERANCE


def test_prequantized_checkpoint_is_loaded_bit_for_bit():
    ours = load_model(MODELS / "llama3_rope", quant="nf4")
    theirs = load_model(MODELS / "llama3_rope_bnb_nf4", quant="nf4")
    for a, b in zip(jax.tree.leaves(nnx.state(ours)), jax.tree.leaves(nnx.state(theirs)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_prequantized_checkpoint_refuses_other_quant_settings():
    with pytest.raises(ValueError, match=r"quantized as nf4, blocksize 64, double_quant=True; load it with those"):
        load_model(MODELS / "llama3_rope_bnb_nf4", quant="fp4")


def _tiny_config(**changes) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return ModelConfig(**{**base, **changes})


def test_lora_zero_b_is_identity():
    config = _tiny_config()
    plain = random_model(config, lora=None, compute_dtype=jnp.float32, seed=3)
    adapted = random_model(config, lora=LoraConfig(rank=8, dropout=0.0), compute_dtype=jnp.float32, seed=3)
    ids = jnp.arange(16).reshape(2, 8)
    np.testing.assert_array_equal(np.asarray(plain(ids)), np.asarray(adapted(ids)))


def test_lora_targets_every_block_linear_but_never_lm_head():
    model = random_model(_tiny_config(), lora=LoraConfig(rank=4))
    adapted = [m for _, m in nnx.iter_graph(model) if isinstance(m, QLoRALinear) and m.lora is not None]
    assert len(adapted) == 7 and all(m.lora_a[...].shape[0] == 2 for m in adapted)  # 7 stacked over 2 layers
    assert model.lm_head is not None and not isinstance(model.lm_head, LoRAParam)


def test_lora_init_follows_peft():
    model = random_model(_tiny_config(), lora=LoraConfig(rank=4))
    a = np.asarray(model.layer(0).mlp.down_proj.lora_a[...])
    assert a.shape == (4, 128) and np.abs(a).max() <= 1 / np.sqrt(128) and a.std() > 0.5 / np.sqrt(3 * 128)
    assert not np.asarray(model.layer(0).mlp.down_proj.lora_b[...]).any()


@pytest.mark.parametrize("rslora,expected", [(False, 16 / 4), (True, 16 / 2)])
def test_lora_scaling(rslora, expected):
    assert LoraConfig(rank=4, alpha=16, rslora=rslora).scaling == expected


def test_gradients_reach_only_lora_params():
    model = random_model(_tiny_config(), lora=LoraConfig(rank=4), compute_dtype=jnp.float32)
    ids = jnp.arange(16).reshape(2, 8)

    def loss(m):
        return jnp.mean(m(ids, rngs=nnx.Rngs(dropout=0)) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, LoRAParam))(model)
    leaves = jax.tree.leaves(nnx.state(grads))
    assert len(leaves) == 2 * 7  # lora_a and lora_b of the 7 projections, stacked over the layers; nothing else
    assert all(leaf.shape[0] == 2 for leaf in leaves)  # the layer axis
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)


def test_quantized_matmul_gradient_matches_dequantized_dense():
    layer_model = random_model(_tiny_config(), compute_dtype=jnp.float32)
    layer = layer_model.layer(0).mlp.up_proj
    w = layer.base_weight(jnp.float32)
    x = jax.random.normal(jax.random.key(0), (3, 64))
    dx = jax.grad(lambda v: jnp.sum(jnp.sin(layer(v))))(x)
    dx_dense = jax.grad(lambda v: jnp.sum(jnp.sin(v @ w.T)))(x)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_dense), rtol=1e-5, atol=1e-6)


def test_kv_cache_decoding_matches_full_forward():
    model = random_model(_tiny_config(sliding_window=5), compute_dtype=jnp.float32, seed=1)
    ids = jax.random.randint(jax.random.key(2), (2, 9), 0, 96)
    mask = jnp.ones((2, 9), bool).at[1, :3].set(False)  # second row left-padded
    full = np.asarray(model(ids, mask))
    cache = KVCache.empty(model.config, batch=2, max_len=12, dtype=jnp.float32)
    prefix_logits, cache = model.decode(ids[:, :6], mask[:, :6], cache)
    steps = [prefix_logits]
    for t in range(6, 9):
        step_logits, cache = model.decode(ids[:, t:t + 1], mask[:, t:t + 1], cache)
        steps.append(step_logits)
    decoded = np.concatenate([np.asarray(s) for s in steps], axis=1)
    real = np.asarray(mask)
    np.testing.assert_allclose(decoded[real], full[real], atol=1e-5)


def test_model_bytes_match_bits_per_parameter_formula():
    config = _tiny_config(hidden_size=256, intermediate_size=512, num_hidden_layers=1)
    model = random_model(config, quant=QuantConfig("nf4", 64, True))
    linears = [m for _, m in nnx.iter_graph(model) if isinstance(m, QLoRALinear)]
    numel = sum(m.in_features * m.out_features for m in linears)
    held = sum(m.quant_nbytes() for m in linears)
    expected_bits = sum(4 * m.in_features * m.out_features + 8 * (m.in_features * m.out_features // 64)
                        + 32 * -(-(m.in_features * m.out_features // 64) // 256) + 32 for m in linears)
    assert held * 8 == expected_bits
    assert abs(8 * held / numel - (4 + 8 / 64 + 32 / (64 * 256))) < 0.01


def test_attention_rule_picks_cudnn_on_gpu_and_its_cuda_lowering_calls_cudnn(monkeypatch):
    """One rule (``attention_implementation``) for the model and the memory formula. Lowered for CUDA on this
    CPU machine (cuDNN's version check patched out: there is no cuDNN here), the forward and backward passes
    are cuDNN's fused attention custom calls."""
    import re

    from flax import nnx
    from jax._src.cudnn import fused_attention_stablehlo

    from qlora_jax.config import LoraConfig, ModelConfig, QuantConfig
    from qlora_jax.loading import random_model
    from qlora_jax.lora import LoRAParam
    from qlora_jax.model import attention_implementation

    assert attention_implementation("gpu", jnp.bfloat16, 128, 512, 512) == "cudnn"
    assert attention_implementation("gpu", jnp.float16, 64, 512, 512) == "cudnn"
    assert attention_implementation("gpu", jnp.float32, 128, 512, 512) is None  # f32: XLA
    assert attention_implementation("gpu", jnp.bfloat16, 256, 512, 512) is None  # head_dim cuDNN does not take
    assert attention_implementation("gpu", jnp.bfloat16, 128, 1, 640) is None  # a decode step (odd T)
    assert attention_implementation("cpu", jnp.bfloat16, 64, 512, 512) is None
    assert attention_implementation("tpu", jnp.bfloat16, 64, 512, 512) is None
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda *args, **kwargs: None)
    model = random_model(ModelConfig("llama", 512, 64, 128, 2, 4, 2, 16), quant=QuantConfig("none"),
                         lora=LoraConfig(rank=4), compute_dtype=jnp.bfloat16, remat="layer")
    graphdef, lora, frozen = nnx.split(model, LoRAParam, ...)
    ids, mask = jnp.zeros((2, 32), jnp.int32), jnp.ones((2, 32), bool)

    def loss(lora):
        return nnx.merge(graphdef, lora, frozen)(ids, mask).astype(jnp.float32).mean()

    text = jax.jit(jax.grad(loss)).trace(lora).lower(lowering_platforms=("cuda",)).as_text()
    assert set(re.findall(r"__cudnn\$\w+", text)) == {"__cudnn$fmhaScaleBiasSoftmax",
                                                       "__cudnn$fmhaScaleBiasSoftmaxBackward"}
