"""Loading Hugging Face directories: layouts, safety checks, memory while streaming."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import FIXTURES

from qlora_jax.loading import load_model
from qlora_jax.safetensors_io import SafetensorsError, SafetensorsFile, load_file, save_file

TINY = FIXTURES / "models" / "llama3_rope"


@pytest.fixture
def tiny_copy(tmp_path):
    target = tmp_path / "model"
    shutil.copytree(TINY, target)
    return target


def test_sharded_checkpoint_loads_like_single_file(tiny_copy):
    tensors = load_file(tiny_copy / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, tiny_copy / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[half:]}, tiny_copy / "model-00002-of-00002.safetensors")
    weight_map = {n: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, n in enumerate(names)}
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tiny_copy / "model.safetensors").unlink()
    sharded = load_model(tiny_copy, quant="nf4")
    single = load_model(TINY, quant="nf4")
    np.testing.assert_array_equal(np.asarray(sharded.layer(1).mlp.down_proj.packed[...]),
                                  np.asarray(single.layer(1).mlp.down_proj.packed[...]))


def test_pickle_checkpoint_is_refused_with_conversion_hint(tiny_copy):
    (tiny_copy / "model.safetensors").unlink()
    (tiny_copy / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match=r"only pickle checkpoints \['pytorch_model.bin'\].*save_pretrained"):
        load_model(tiny_copy)


def test_index_pointing_at_missing_shard(tiny_copy):
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "missing.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"lists shards that do not exist: \['missing.safetensors'\]"):
        load_model(tiny_copy)


def test_index_cannot_escape_the_model_directory(tiny_copy):
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(ValueError, match=r"shard path '../../etc/passwd' points outside"):
        load_model(tiny_copy)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model directory .*nope does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"has no config.json"):
        load_model(tmp_path)


def test_unsupported_model_type_names_the_supported_ones(tiny_copy):
    config = json.loads((tiny_copy / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (tiny_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type='gpt_neox' is not supported; supported: llama, mistral, qwen2"):
        load_model(tiny_copy)


def test_config_weight_shape_mismatch_names_the_tensor(tiny_copy):
    config = json.loads((tiny_copy / "config.json").read_text())
    config["intermediate_size"] = 192
    (tiny_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"gate_proj.weight has shape \(128, 64\) but config.json implies \(192, 64\)"):
        load_model(tiny_copy)


def test_truncated_safetensors_is_rejected(tiny_copy):
    path = tiny_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SafetensorsError, match=r"model\.safetensors: not a valid safetensors file: .*incomplete"):
        load_model(tiny_copy)


def test_absurd_header_length_is_rejected_before_allocation(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes((10**15).to_bytes(8, "little") + b"{}")
    with pytest.raises(SafetensorsError, match=r"evil\.safetensors: not a valid safetensors file: .*header too large"):
        SafetensorsFile(path)


def test_streaming_load_peak_memory_stays_near_the_quantized_size(tmp_path):
    """A 98 MiB bf16 checkpoint (12 layers of 8 MiB) loads within one layer of its quantized size.

    glibc is told to return freed buffers to the OS at once; with its default dynamic mmap
    threshold, freed multi-MiB buffers stay resident and blur the measurement (34 vs 52 MiB).
    """
    script = textwrap.dedent(f"""
        import json, sys, ml_dtypes, numpy as np, jax.numpy as jnp
        sys.path.insert(0, {str(FIXTURES.parent.parent)!r})
        from qlora_jax.config import PROJECTIONS, ModelConfig
        from qlora_jax.loading import load_model, peak_rss_mib
        from qlora_jax.quant import quantize
        from qlora_jax.safetensors_io import save_streaming
        d = {str(tmp_path)!r}
        cfg = ModelConfig(model_type="llama", vocab_size=1024, hidden_size=512, intermediate_size=2048,
                          num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=8, head_dim=64)
        json.dump(cfg.to_hf_dict(), open(d + "/config.json", "w"))
        names = {{"model.embed_tokens.weight": (1024, 512), "lm_head.weight": (1024, 512), "model.norm.weight": (512,)}}
        for i in range(12):
            for n, s in cfg.linear_shapes().items():
                names[f"model.layers.{{i}}.{{PROJECTIONS[n]}}.{{n}}.weight"] = s
            names[f"model.layers.{{i}}.input_layernorm.weight"] = (512,)
            names[f"model.layers.{{i}}.post_attention_layernorm.weight"] = (512,)
        rng = np.random.default_rng(0)
        specs = [(n, s, ml_dtypes.bfloat16) for n, s in names.items()]
        save_streaming(specs, lambda n: (rng.standard_normal(names[n]) * 0.02).astype(ml_dtypes.bfloat16),
                       d + "/model.safetensors")
        for s in set(cfg.linear_shapes().values()):  # compile quantize for each shape before measuring
            quantize(jnp.ones(s, jnp.bfloat16)).packed.block_until_ready()
        before = peak_rss_mib()
        load_model(d, quant="nf4")
        print(json.dumps({{"before": before, "after": peak_rss_mib()}}))
    """)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc: return freed buffers to the OS at once
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    linear = 12 * 4 * 1024 * 1024
    checkpoint_mib = (linear + 2 * 1024 * 512 + 25 * 512) * 2 / 2**20
    quantized_mib = (linear * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + (2 * 1024 * 512 + 25 * 512) * 2) / 2**20
    layer_mib = 4 * 1024 * 1024 * 2 / 2**20
    growth = rss["after"] - rss["before"]
    print(f"peak RSS grew {growth:.0f} MiB loading a {checkpoint_mib:.0f} MiB bf16 checkpoint "
          f"(quantized {quantized_mib:.0f} MiB, one layer {layer_mib:.0f} MiB)")
    assert growth < quantized_mib + layer_mib + 4


def test_sentencepiece_tokenizer_model_with_bos_and_chat_template(tmp_path):
    """A tokenizer.model directory (LLaMA 1/2, Mistral layout): BOS added per tokenizer_config, round trip."""
    import sentencepiece

    from qlora_jax.tokenizer import load_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog number {i}" for i in range(200)))
    sentencepiece.SentencePieceTrainer.Train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"),
                                             vocab_size=60, model_type="bpe", bos_id=1, eos_id=2, unk_id=0,
                                             pad_id=-1, minloglevel=2)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
        "chat_template": "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"}))
    tokenizer = load_tokenizer(tmp_path)
    ids = tokenizer.encode("the lazy fox")
    assert ids[0] == tokenizer.bos_id == 1 and tokenizer.eos_id == 2 and tokenizer.pad_id == 2
    assert tokenizer.decode(ids[1:]) == "the lazy fox"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi</s>"
