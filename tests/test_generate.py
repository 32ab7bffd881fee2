"""Generation: sampling rules, streaming equals batched decoding, stop strings, and the CLI."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES

from qlora_jax.generate import Sampling, _left_padded, generate, generate_ids, main, pick_token, stream
from qlora_jax.loading import load_for_inference, load_model


@pytest.fixture(scope="module")
def tiny(tiny_chat_model):
    return load_for_inference(tiny_chat_model)


def test_sampling_rules():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    greedy = pick_token(logits, keys[0], Sampling())
    assert int(greedy[0]) == 0
    def draws(sampling):
        return {int(pick_token(logits, k, sampling)[0]) for k in keys}

    assert draws(Sampling(temperature=1.0, top_k=1)) == {0}
    assert draws(Sampling(temperature=1.0, top_k=2)) == {0, 1}
    assert draws(Sampling(temperature=1.0, top_p=0.6)) == {0, 1}  # 0.5 < 0.6: the second token is needed
    assert draws(Sampling(temperature=1.0, top_p=0.5)) == {0}
    assert draws(Sampling(temperature=1.0)) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        Sampling(top_p=0.0)


def test_stream_equals_batched_greedy_and_stops(tiny):
    model, tokenizer = tiny
    prompts = ["Hello there, how", "The capital of France is a city that"]
    batched = generate(model, tokenizer, prompts, max_new_tokens=12)
    streamed = "".join(stream(model, tokenizer, prompts[1], 12, Sampling()))
    assert streamed == batched[1]
    assert batched[0] == generate(model, tokenizer, prompts[:1], max_new_tokens=12)[0]  # padding changes nothing
    stop = batched[1][3:6]
    cut = generate(model, tokenizer, prompts[1:], max_new_tokens=12, stop=(stop,))[0]
    assert cut == batched[1][: batched[1].index(stop)]
    sampled = generate(model, tokenizer, prompts, 12, sampling=Sampling(temperature=1.0, seed=3))
    assert sampled == generate(model, tokenizer, prompts, 12, sampling=Sampling(temperature=1.0, seed=3))


def test_generation_stops_at_any_eos_id_the_model_config_lists(tiny_chat_model, tmp_path):
    """LLaMA-3 lists several ids in generation_config.json's eos_token_id; each one ends the reply."""
    model, tokenizer = load_for_inference(tiny_chat_model)
    prompt = "The capital of France is a city that"
    ids, mask = _left_padded(tokenizer, [prompt])
    tokens = np.asarray(generate_ids(model, ids, mask, max_new_tokens=12, sampling=Sampling()))[0].tolist()
    stop_id = next(t for t in tokens[3:] if t not in tokens[:3] and t != tokenizer.eos_id)
    directory = tmp_path / "model"
    shutil.copytree(tiny_chat_model, directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.eos_id, stop_id]}))
    model, tokenizer = load_for_inference(directory)
    assert stop_id in tokenizer.stop_ids and tokenizer.eos_id in tokenizer.stop_ids
    expected = tokenizer.decode(tokens[: tokens.index(stop_id)])
    assert generate(model, tokenizer, [prompt], max_new_tokens=12) == [expected]
    assert "".join(stream(model, tokenizer, prompt, 12, Sampling())) == expected


def test_generate_cli(tiny_chat_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "What is 2 plus 2?"}]}) + "\n")
    assert main(["--model", str(tiny_chat_model), "--prompts", str(prompts), "--max-new-tokens", "5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [sorted(line) for line in lines] == [["completion", "prompt"], ["completion", "messages"]]
    assert main(["--model", str(tiny_chat_model), "--prompt", "Hi", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == lines[0]["completion"].strip()
    prompts.write_text("{oops\n")
    assert main(["--model", str(tiny_chat_model), "--prompts", str(prompts)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {prompts}:1: invalid JSON on line 1, column 2: Expecting")


@pytest.mark.parametrize("name", ["llama3_rope", "mistral_window", "qwen2_bias_tied", "llama_headdim_linear"])
def test_greedy_equals_transformers_greedy(name):
    """scripts/make_generation_fixtures.py: transformers' model.generate(do_sample=False), float32, left padding."""
    reference = json.loads((FIXTURES / "models" / "greedy_reference.json").read_text())
    model = load_model(FIXTURES / "models" / name, quant="none", compute_dtype=jnp.float32)
    ids = jnp.asarray(reference["input_ids"], jnp.int32)
    mask = jnp.asarray(reference["attention_mask"], bool)
    tokens = generate_ids(model, ids, mask, max_new_tokens=12, sampling=Sampling())
    assert np.asarray(tokens).tolist() == reference["new_tokens"][name]


def test_generate_refuses_an_adapter_of_another_base_model(tiny_chat_model, tmp_path, capsys):
    import dataclasses

    from qlora_jax.config import LoraConfig, ModelConfig, QuantConfig
    from qlora_jax.loading import random_model
    from qlora_jax.peft import save_peft_adapter

    config = ModelConfig.from_hf_dict(json.loads((tiny_chat_model / "config.json").read_text()))
    other = random_model(dataclasses.replace(config, intermediate_size=96), quant=QuantConfig("none"),
                         lora=LoraConfig(rank=4, alpha=8.0), seed=3)
    adapter = save_peft_adapter(other, tmp_path / "adapter", "another-base")
    capsys.readouterr()
    assert main(["--model", str(tiny_chat_model), "--adapter", str(adapter), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: {adapter}: base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight has shape "
                          "(96, 4), the model expects (128, 4) (different base model or rank?)"), err
