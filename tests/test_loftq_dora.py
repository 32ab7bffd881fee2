"""LoftQ initialization and DoRA against PEFT 0.21 (fixtures: scripts/make_loftq_dora_fixtures.py)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, train_config
from flax import nnx

from qlora_jax.config import LORA_TARGETS, PROJECTIONS, LoraConfig, QuantConfig
from qlora_jax.config_io import ConfigError, load_run_config
from qlora_jax.loading import load_model
from qlora_jax.loftq import loftq
from qlora_jax.lora import LoRAParam, QLoRALinear
from qlora_jax.peft import load_peft_adapter, read_adapter_config, save_peft_adapter
from qlora_jax.quant import dequantize, quantize
from qlora_jax.safetensors_io import load_file
from qlora_jax.train import train

MODELS = FIXTURES / "models"
BASE = MODELS / "llama3_rope"
TOLERANCE = 1e-4  # fp32 logits on both sides (tests/test_model.py's FP32_TOLERANCE)


@pytest.fixture(scope="module")
def oracle():
    with np.load(MODELS / "loftq_dora.npz") as data, np.load(MODELS / "reference_logits.npz") as batch:
        return {**{k: data[k] for k in data.files}, "ids": batch["right_ids"], "mask": batch["right_mask"]}


def _max_error(model, oracle, key) -> float:
    logits = np.asarray(model(jnp.asarray(oracle["ids"]), jnp.asarray(oracle["mask"])))
    return float(np.abs(logits - oracle[key])[oracle["mask"].astype(bool)].max())


def _dora_model(alpha=8.0):
    lora = LoraConfig(rank=4, alpha=alpha, dropout=0.0, dora=True)
    return load_model(BASE, quant=QuantConfig("none"), lora=lora, compute_dtype=jnp.float32)


def _adapted(model):
    return [(f"{block}.{name}", getattr(getattr(model.layers, block), name)) for name, block in PROJECTIONS.items()]


def test_dora_adapter_from_peft_gives_peft_logits(oracle):
    model = _dora_model()
    load_peft_adapter(model, MODELS / "llama3_rope_peft_dora")
    assert _max_error(model, oracle, "peft_dora/right_logits") < TOLERANCE


def test_our_dora_adapter_gives_in_peft_the_logits_it_gives_here(oracle, tmp_path):
    model = _dora_model()
    load_peft_adapter(model, MODELS / "llama3_rope_ours_dora")
    assert _max_error(model, oracle, "ours_dora/right_logits") < TOLERANCE  # PEFT's logits with our adapter
    save_peft_adapter(model, tmp_path / "again", str(BASE))
    written, peft_written = load_file(tmp_path / "again" / "adapter_model.safetensors"), load_file(
        MODELS / "llama3_rope_peft_dora" / "adapter_model.safetensors")
    assert sorted(written) == sorted(peft_written)  # PEFT's names, magnitude included
    assert all(written[k].shape == peft_written[k].shape for k in written)
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["use_dora"] is True


def test_dora_starts_as_the_base_model_with_magnitudes_the_row_norms():
    plain = load_model(BASE, quant=QuantConfig("nf4"), lora=LoraConfig(rank=4, dropout=0.0),
                       compute_dtype=jnp.float32)
    dora = load_model(BASE, quant=QuantConfig("nf4"), lora=LoraConfig(rank=4, dropout=0.0, dora=True),
                      compute_dtype=jnp.float32)
    ids = jnp.arange(3, 15)[None]
    np.testing.assert_allclose(np.asarray(dora(ids)), np.asarray(plain(ids)), atol=1e-4)
    layer = dora.layer(1).mlp.down_proj
    weight = np.asarray(dequantize(layer.quantized_weight(), jnp.float32))
    np.testing.assert_allclose(np.asarray(layer.lora_magnitude[...]), np.linalg.norm(weight, axis=1), rtol=1e-5)


def test_weight_norm_equals_the_norm_of_the_summed_matrix():
    layer = _dora_model(alpha=8.0).layer(0).mlp.gate_proj
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.normal(0, 0.3, v.get_value().shape), jnp.float32) for v in (layer.lora_a, layer.lora_b))
    direct = np.linalg.norm(np.asarray(layer.base_weight(jnp.float32)) + 2.0 * np.asarray(b @ a), axis=1)
    np.testing.assert_allclose(np.asarray(layer.weight_norm(a, b)), direct, rtol=1e-5)


def test_dora_gradients_reach_magnitude_and_adapters_only():
    model = _dora_model()
    load_peft_adapter(model, MODELS / "llama3_rope_peft_dora")
    graphdef, params, rest = nnx.split(model, LoRAParam, ...)
    ids = jnp.arange(3, 15)[None]

    def loss(params):
        return jnp.mean(nnx.merge(graphdef, params, rest)(ids) ** 2)

    grads = jax.grad(loss)(params)
    magnitude = grads["layers"]["mlp"]["up_proj"]["lora_magnitude"][...]
    assert magnitude.shape == (2, 128) and float(jnp.abs(magnitude).min()) > 0
    step = 1e-3  # the norm is held constant: d loss / d m is the slope along m alone
    bumped = jax.tree.map(lambda x: x, params)
    up = bumped["layers"]["mlp"]["up_proj"]["lora_magnitude"]
    up.set_value(up.get_value().at[0, 5].add(step))
    slope = (loss(bumped) - loss(params)) / step
    np.testing.assert_allclose(float(slope), float(magnitude[0, 5]), rtol=2e-2)


def _sign_aligned(ours: np.ndarray, theirs: np.ndarray, axis: int) -> np.ndarray:
    """``ours`` with each rank component's sign flipped to agree with ``theirs`` (SVD fixes factors up to sign)."""
    signs = np.sign(np.sum(ours * theirs, axis=axis, keepdims=True))
    return ours * signs


def test_loftq_init_equals_peft_replace_lora_weights_loftq(oracle):
    model = load_model(BASE, quant=QuantConfig("nf4"), lora=LoraConfig(rank=4, alpha=4, dropout=0.0, init="loftq"),
                       compute_dtype=jnp.float32)
    theirs = load_file(MODELS / "llama3_rope_peft_loftq" / "adapter_model.safetensors")
    for name, module in _adapted(model):
        for i in range(2):
            prefix = f"base_model.model.model.layers.{i}.{name}"
            a, b = np.asarray(module.lora_a[...][i]), np.asarray(module.lora_b[...][i])
            np.testing.assert_allclose(_sign_aligned(a, theirs[prefix + ".lora_A.weight"], 1),
                                       theirs[prefix + ".lora_A.weight"], atol=2e-5)
            np.testing.assert_allclose(_sign_aligned(b, theirs[prefix + ".lora_B.weight"], 0),
                                       theirs[prefix + ".lora_B.weight"], atol=2e-5)
    assert _max_error(model, oracle, "peft_loftq/right_logits") < TOLERANCE


def test_loftq_divides_out_the_lora_scaling_that_peft_leaves_in():
    """alpha = 2r: our factors are PEFT's over sqrt(2), so the adapted layer starts at the residual fit."""
    theirs = load_file(MODELS / "llama3_rope_peft_loftq" / "adapter_model.safetensors")
    model = load_model(BASE, quant=QuantConfig("nf4"), lora=LoraConfig(rank=4, alpha=8, dropout=0.0, init="loftq"),
                       compute_dtype=jnp.float32)
    layer = model.layer(0).self_attn.q_proj
    a = np.asarray(layer.lora_a[...])
    peft_a = theirs["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    np.testing.assert_allclose(_sign_aligned(a, peft_a, 1), peft_a / np.sqrt(2.0), atol=2e-5)
    weight = load_file(BASE / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].astype(np.float32)
    base = np.asarray(layer.base_weight(jnp.float32))
    start = base + layer.lora.scaling * np.asarray(layer.lora_b[...]) @ a
    assert np.linalg.norm(weight - start) < 0.9 * np.linalg.norm(weight - base)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"])
def test_loftq_iterations_equal_peft_loftq_init(oracle, name):
    """Three alternations, NF4 without double quant (PEFT's loftq_init): same base, same adapters."""
    weight = jnp.asarray(oracle[f"loftq3/{name}/weight"]).astype(jnp.bfloat16)
    q, a, b = loftq(weight, QuantConfig("nf4", double_quant=False), rank=4, scaling=1.0, iters=3)
    dequantized = np.asarray(dequantize(q, jnp.bfloat16).astype(jnp.float32))  # PEFT returns the weight's dtype
    np.testing.assert_array_equal(dequantized, oracle[f"loftq3/{name}/dequantized"])
    np.testing.assert_allclose(_sign_aligned(np.asarray(a), oracle[f"loftq3/{name}/lora_a"], 1),
                               oracle[f"loftq3/{name}/lora_a"], atol=1e-4)
    np.testing.assert_allclose(_sign_aligned(np.asarray(b), oracle[f"loftq3/{name}/lora_b"], 0),
                               oracle[f"loftq3/{name}/lora_b"], atol=1e-4)
    single, _, _ = loftq(weight, QuantConfig("nf4", double_quant=False), rank=4, scaling=1.0, iters=1)
    standard = quantize(weight, "nf4", 64, False)
    np.testing.assert_array_equal(np.asarray(single.packed), np.asarray(standard.packed))  # one pass: Q(W)


def test_loftq_refuses_a_prequantized_checkpoint():
    with pytest.raises(ValueError, match="bitsandbytes 4-bit checkpoint.*unquantized model"):
        load_model(MODELS / "llama3_rope_bnb_nf4", quant=QuantConfig("nf4"), lora=LoraConfig(rank=4, init="loftq"))


@pytest.mark.parametrize("overrides, message", [
    (["lora.loftq_iters=3"], "lora.loftq_iters=3 needs lora.init: loftq"),
    (["lora.init=loftq", "quant.quant_type=none"], "quant.quant_type: none has none"),
    (["lora.init=loftq", "lora.loftq_iters=2", "quant.quant_type=int4"], "holds nf4 or fp4, not int4"),
    (["lora.init=loftq", "model.adapter=some/dir"], "both set the adapters' start"),
    (["lora.init=svd"], "lora.init"),
    (["lora.loftq_iters=0"], "must be a positive integer"),
])
def test_bad_loftq_combinations_give_one_line(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as err:
        load_run_config(None, overrides)
    assert "\n" not in str(err.value)


def test_dora_with_an_unquantized_base_is_a_valid_config():
    config = load_run_config(None, ["lora.dora=true", "quant.quant_type=none"])
    assert config.lora.dora and not config.quant.quantized
    assert set(config.lora.targets) == set(LORA_TARGETS)


def test_every_adapted_module_is_a_qlora_linear_with_a_magnitude():
    model = _dora_model()
    assert all(isinstance(module, QLoRALinear) and module.lora_magnitude is not None for _, module in _adapted(model))


def test_a_loftq_dora_run_trains_and_saves_the_base_its_adapter_belongs_to(tiny_chat_model, chat_file, tmp_path):
    run_dir = tmp_path / "run"
    config = train_config(tiny_chat_model, chat_file, run_dir, **{"lora.init": "loftq", "lora.loftq_iters": 2,
                                                                   "lora.dora": "true", "train.steps": 4})
    summary = train(config, log=lambda *_: None)
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.3
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(run_dir / "base") and adapter_config["use_dora"]
    saved = load_model(run_dir / "base", quant=config.quant)  # a bitsandbytes 4-bit checkpoint, loaded as stored
    fitted = load_model(tiny_chat_model, quant=config.quant, lora=config.lora)  # the run's LoftQ base, again
    original = load_model(tiny_chat_model, quant=config.quant)

    def layer(model):
        return model.layer(1).mlp.up_proj.quantized_weight().packed

    np.testing.assert_array_equal(np.asarray(layer(saved)), np.asarray(layer(fitted)))
    assert not np.array_equal(np.asarray(layer(saved)), np.asarray(layer(original)))  # re-quantized: W - s B A
    model = load_model(run_dir / "base", quant=config.quant, lora=read_adapter_config(run_dir / "adapter"))
    load_peft_adapter(model, run_dir / "adapter")
    magnitude = model.layers.mlp.up_proj.lora_magnitude[...]
    assert magnitude.shape == (2, 128) and bool(jnp.all(magnitude > 0))


def test_inspect_counts_a_dora_adapters_magnitudes(tmp_path, capsys):
    from qlora_jax.inspect import main as inspect_main

    adapter = tmp_path / "adapter"
    shutil.copytree(MODELS / "llama3_rope_peft_dora", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(BASE)}))
    assert inspect_main([str(adapter)]) == 0
    shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
              "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}
    params = 2 * sum(4 * (out + inn) + out for out, inn in shapes.values())  # A, B and a magnitude per row
    assert f"DoRA (r=4, alpha=8, targets={','.join(sorted(LORA_TARGETS))}, fp32): {params:,} params" in (
        capsys.readouterr().out)
