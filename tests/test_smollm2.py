"""The real default model: GGUF conversion, tokenizer, perplexity and a chat answer vs transformers."""

import math
import subprocess
import sys

import jax.numpy as jnp
import optax
import pytest

from qlora_jax.generate import generate
from qlora_jax.gguf_import import unpermute_rope_rows
from qlora_jax.loading import load_model
from qlora_jax.tokenizer import load_tokenizer


def test_tokenizer_ids_match_transformers_gguf_tokenizer(smollm2_dir, smollm2_reference):
    tokenizer = load_tokenizer(smollm2_dir)
    for text, ids in smollm2_reference["samples"].items():
        assert tokenizer.encode(text) == ids, text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.encode(smollm2_reference["text"]) == smollm2_reference["text_ids"]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)


def test_chat_template_renders_like_transformers(smollm2_dir, smollm2_reference):
    tokenizer = load_tokenizer(smollm2_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True)
    assert prompt == smollm2_reference["chat_prompt"]


def test_perplexity_matches_transformers(smollm2_dir, smollm2_reference):
    model = load_model(smollm2_dir, quant="none", compute_dtype=jnp.float32)
    ids = jnp.asarray([smollm2_reference["text_ids"]])
    nll = optax.softmax_cross_entropy_with_integer_labels(model(ids)[0, :-1], ids[0, 1:]).mean()
    # fp32 on both sides over 303 tokens; measured relative difference 1e-5.
    assert math.exp(float(nll)) == pytest.approx(smollm2_reference["perplexity"], rel=1e-4)


def test_nf4_greedy_chat_answers_paris(smollm2_dir, smollm2_reference):
    model = load_model(smollm2_dir, quant="nf4", compute_dtype=jnp.float32)
    tokenizer = load_tokenizer(smollm2_dir)
    [answer] = generate(model, tokenizer, [smollm2_reference["chat_prompt"]], max_new_tokens=8)
    assert "Paris" in answer


def test_unpermute_inverts_llama_cpp_permute():
    heads, head_dim, width = 3, 8, 5
    weight = jnp.arange(heads * head_dim * width, dtype=jnp.float32).reshape(heads * head_dim, width)
    permuted = weight.reshape(heads, 2, head_dim // 2, width).swapaxes(1, 2).reshape(weight.shape)  # llama.cpp
    assert (unpermute_rope_rows(permuted, heads) == weight).all()


def test_inspect_reports_4127_bits_per_param(smollm2_dir):
    out = subprocess.run([sys.executable, "-m", "qlora_jax.inspect", str(smollm2_dir)], capture_output=True,
                         text=True, check=True).stdout
    assert "30 layers, D=576" in out and "106,168,320" in out and "= 4.127 bits/param" in out


def test_convert_cli_reports_missing_file_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "qlora_jax.convert", "--gguf", str(tmp_path / "x.gguf"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: GGUF file {tmp_path / 'x.gguf'} does not exist"
