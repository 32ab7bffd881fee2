"""Training: config errors, data masking on a real tokenizer, LoRA-only optimizer state, resume, PEFT."""

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, train_config
from flax import nnx

from qlora_jax.config import DataConfig, LoraConfig
from qlora_jax.config_io import ConfigError, load_run_config
from qlora_jax.data import IGNORE, DataError, Encoder, load_dataset
from qlora_jax.loading import load_model
from qlora_jax.lora import LoRAParam
from qlora_jax.peft import load_peft_adapter, save_peft_adapter
from qlora_jax.safetensors_io import load_file
from qlora_jax.tokenizer import load_tokenizer
from qlora_jax.train import train

MODELS = FIXTURES / "models"


def test_training_lowers_held_out_loss_and_writes_outputs(tiny_chat_model, chat_file, tmp_path):
    run_dir = tmp_path / "run"
    summary = train(train_config(tiny_chat_model, chat_file, run_dir, **{"train.steps": 6}), log=lambda *_: None)
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.5
    assert summary["train_step_compilations"] == 1  # every batch padded to the one 64-token bucket
    for name in ("config.yaml", "metrics.jsonl", "loss_curve.png", "summary.json", "adapter/adapter_config.json"):
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_4", "step_6"]  # keep 2
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_logged_to_a_file_reports_progress_compile_time_and_what_to_try(tiny_chat_model, chat_file, tmp_path):
    """As under nohup: stderr is not a terminal, so tqdm would be silent; plain progress lines come instead."""
    run_dir = tmp_path / "run"
    settings = {"model.path": tiny_chat_model, "data.format": "chat", "data.path": chat_file, "train.out_dir": tmp_path,
                "train.run_name": "run", "train.steps": 4, "train.log_every": 2, "train.eval_every": 0,
                "data.max_len": 64, "train.batch_size": 2, "lora.rank": 4, "data.eval_size": 8}
    result = subprocess.run([sys.executable, "-m", "qlora_jax.train",
                             *sum((["--set", f"{k}={v}"] for k, v in settings.items()), [])],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert re.search(r"compiling the train step for 1 x 2 x 64 tokens \(micro-batches x rows x length\) \.\.\.\n"
                     r"compiled and ran step 1 in [\d.]+ s", output), output
    assert re.search(r"step 3/4, loss \d+\.\d{4}, lr [\d.e+-]+, \d+ tok/s, ETA \d+s", output), output
    assert re.search(r"step 4/4, loss .*, ETA 0s", output), output
    assert f"adapter (PEFT format): {run_dir / 'adapter'}" in output and f"loss plot: {run_dir / 'loss_curve.png'}" \
        in output
    command = re.search(r"try it: (python -m qlora_jax\.generate .*)", output).group(1)
    assert command == f"python -m qlora_jax.generate --adapter {run_dir / 'adapter'} --prompt 'Hello! How are you?'"
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tiny_chat_model)


def test_plain_progress_prints_every_n_steps_or_every_30_seconds():
    from qlora_jax.progress import PlainProgress

    now, lines = [0.0], []

    class Out:
        def write(self, text):
            lines.extend(line for line in text.splitlines() if line)

        def flush(self):
            pass

    progress = PlainProgress(1, 100, every=10, seconds=30, out=Out(), clock=lambda: now[0])
    values = {"loss": 1.5, "lr": 1e-4, "tokens_per_s": 250.0}
    for done in range(2, 12):
        now[0] += 1.0
        progress.update(done, values)
    assert lines == ["step 11/100, loss 1.5000, lr 1.00e-04, 250 tok/s, ETA 1m29s"]  # 1 s/step, 89 steps left
    now[0] += 45.0  # a slow step: 30 s passed, print before 10 more steps
    progress.update(12, values)
    assert lines[-1].startswith("step 12/100") and len(lines) == 2


def test_optimizer_state_holds_only_lora_params(tiny_chat_model):
    from qlora_jax.config import OptimConfig

    model = load_model(tiny_chat_model, quant="nf4", lora=LoraConfig(rank=4))
    _, lora, frozen = nnx.split(model, LoRAParam, ...)
    tx, _ = OptimConfig().build(10)
    opt_state = tx.init(lora)

    def nbytes(tree):
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))

    lora_bytes = nbytes(lora)
    scalars = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(opt_state) if leaf.ndim == 0)
    assert nbytes(opt_state) - scalars == 2 * lora_bytes  # Adam's mu and nu, nothing for the base
    assert nbytes(frozen) > lora_bytes  # the base exists, and got no state


def test_bf16_adapters_get_float32_adamw_moments_and_float32_update_math():
    """``lora.dtype: bfloat16`` as bitsandbytes' 32-bit AdamW runs it: the moments and the update are exactly
    AdamW's on float32 copies of the bf16 parameters and gradients; only the new parameters are rounded."""
    from qlora_jax.config import OptimConfig

    keys = jax.random.split(jax.random.key(0), 3)
    params = {"a": jax.random.normal(keys[0], (8, 16)).astype(jnp.bfloat16),
              "b": jax.random.normal(keys[1], (16,)).astype(jnp.bfloat16)}
    grads = jax.tree.map(lambda p: (0.1 * jax.random.normal(keys[2], p.shape)).astype(jnp.bfloat16), params)
    as_f32 = jax.tree.map(lambda x: x.astype(jnp.float32), (params, grads))
    tx, _ = OptimConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=0.0).build(10)
    state = tx.init(params)
    assert {leaf.dtype for leaf in jax.tree.leaves(state) if leaf.ndim} == {jnp.dtype(jnp.float32)}
    import optax

    reference = optax.adamw(1e-2, weight_decay=0.1)
    reference_state = reference.init(as_f32[0])
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        want_updates, reference_state = reference.update(as_f32[1], reference_state, as_f32[0])
        arrays = [[leaf for leaf in jax.tree.leaves(tree) if leaf.ndim]
                  for tree in ((updates, state), (want_updates, reference_state))]  # updates, mu, nu
        for got, want in zip(*arrays, strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        new = optax.apply_updates(params, updates)
        for name in params:
            assert new[name].dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(new[name]), np.asarray(
                (params[name].astype(jnp.float32) + updates[name]).astype(jnp.bfloat16)))
        params = new
        as_f32 = jax.tree.map(lambda x: x.astype(jnp.float32), (params, grads))


def test_bf16_adapters_train_and_save_what_they_hold(tiny_chat_model, chat_file, tmp_path):
    """A run with ``lora.dtype: bfloat16`` trains (held-out loss falls as with float32 adapters), checkpoints
    bf16 adapters with float32 moments, and its PEFT adapter (float32 tensors, as PEFT keeps adapters) holds
    exactly the trained bf16 values."""
    run_dir = tmp_path / "run"
    summary = train(train_config(tiny_chat_model, chat_file, run_dir, **{"train.steps": 6, "lora.dtype": "bfloat16"}),
                    log=lambda *_: None)
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.5
    model = load_model(tiny_chat_model, quant="nf4", lora=LoraConfig(rank=4, dropout=0.1, dtype="bfloat16"))
    _, lora, _ = nnx.split(model, LoRAParam, ...)
    assert {leaf.dtype for leaf in jax.tree.leaves(lora)} == {jnp.dtype(jnp.bfloat16)}
    tensors = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float32)}
    load_peft_adapter(model, run_dir / "adapter")
    _, loaded, _ = nnx.split(model, LoRAParam, ...)
    assert {leaf.dtype for leaf in jax.tree.leaves(loaded)} == {jnp.dtype(jnp.bfloat16)}
    for name, values in tensors.items():  # bf16 values, written exactly as float32
        np.testing.assert_array_equal(values, values.astype(jnp.bfloat16).astype(np.float32), err_msg=name)
    from qlora_jax.config import OptimConfig
    from qlora_jax.train import _restore

    saved_lora, saved_state, _ = _restore(run_dir, 6, lora, OptimConfig().build(6)[0].init(lora))
    assert {leaf.dtype for leaf in jax.tree.leaves(saved_lora)} == {jnp.dtype(jnp.bfloat16)}
    assert {leaf.dtype for leaf in jax.tree.leaves(saved_state) if leaf.ndim} == {jnp.dtype(jnp.float32)}
    for saved, final in zip(jax.tree.leaves(saved_lora), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(final))  # the adapter is the last checkpoint


def test_chat_masking_trains_exactly_the_assistant_replies(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    encoder = Encoder(tokenizer, DataConfig(format="chat", path="x", max_len=512))
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! 42 apples."},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]
    example = encoder.chat(messages)
    trained = tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels, strict=True)
                                if lab != IGNORE], skip_special_tokens=False)
    assert trained == "Hello! 42 apples.<|im_end|>See you.<|im_end|>"
    assert tokenizer.decode(list(example.input_ids), skip_special_tokens=False) == tokenizer.apply_chat_template(
        messages)


def test_content_scoring_takes_every_message_and_no_template_or_system_prompt(smollm2_dir):
    """SmolLM2's template adds a system prompt of its own; the content measure skips it and the markup."""
    tokenizer = load_tokenizer(smollm2_dir)
    encoder = Encoder(tokenizer, DataConfig(format="chat", path="x", max_len=512))
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! 42 apples."}]
    example = encoder.content(messages)
    assert "You are a helpful AI assistant" in tokenizer.apply_chat_template(messages)
    scored = tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != IGNORE],
                              skip_special_tokens=False)
    assert scored == "Hi thereHello! 42 apples."
    assert example.messages == messages and encoder.chat(messages).messages == messages
    short = Encoder(tokenizer, DataConfig(format="chat", path="x", max_len=20))
    np.testing.assert_array_equal(short.content(messages).input_ids, short.chat(messages).input_ids)  # cut alike
    assert len(short.content(messages).labels) == 20


def test_alpaca_masks_the_prompt_and_truncates_like_qlora(smollm2_dir, tmp_path):
    tokenizer = load_tokenizer(smollm2_dir)
    config = DataConfig(format="alpaca", path="x", source_max_len=16, target_max_len=6)
    example = Encoder(tokenizer, config).record(
        {"instruction": "Name three colors", "output": "red, green and blue"}, "x:1")
    assert len(example.input_ids) == 16 + 6 and example.truncated
    assert (example.labels[:16] == IGNORE).all()
    assert tokenizer.decode(list(example.labels[16:])) == "red, green and blue"[:len(
        tokenizer.decode(list(example.labels[16:])))]
    assert example.input_ids[0] == tokenizer.bos_id


@pytest.mark.parametrize("line,message", [
    ('{"instruction": "x"}', r"data.jsonl:2: field 'output' must be a string, got NoneType"),
    ('{"instruction": "x", "output": ""}', r"data.jsonl:2: field 'output' is empty"),
    ('{"instruction": 3, "output": "y"}', r"data.jsonl:2: field 'instruction' must be a string, got int"),
    ("{not json", r"data.jsonl:2: invalid JSON on line 2, column 2: Expecting property name"),
    ('[1, 2]', r"data.jsonl:2: expected a JSON object, got list"),
])
def test_malformed_records_name_file_and_line(smollm2_dir, tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "ok", "output": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        load_dataset(DataConfig(format="alpaca", path=str(path), eval_size=0), load_tokenizer(smollm2_dir), 0)


def test_malformed_records_can_be_skipped_and_counted(smollm2_dir, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(['{"instruction": "a", "output": "b"}'] * 3 + ['{"instruction": "x"}']))
    dataset = load_dataset(DataConfig(format="alpaca", path=str(path), eval_size=1, skip_malformed=True),
                           load_tokenizer(smollm2_dir), 0)
    assert (len(dataset.train), len(dataset.eval), dataset.skipped) == (2, 1, 1)


@pytest.mark.parametrize("override,message", [
    ("lora.rnak=4", r"unknown key 'lora.rnak'; did you mean 'rank'\?"),
    ("lora.rank=0", r"lora.rank=0 must be a positive integer"),
    ("optimizer.lr=-1", r"optimizer.lr=-1.0 must be > 0"),
    ("train.batch_size=0", r"train.batch_size=0 must be an integer >= 1"),
    ("optimizer.lr=fast", r"optimizer.lr: expected a number, got 'fast'"),
    ("quant.quant_type=nf5", r"quant.quant_type: 'nf5' is not one of 'nf4', 'fp4', 'int4', 'none'"),
    ("data.format=alpaca", r"data.path is required for data.format='alpaca'"),
    ("traing.steps=3", r"unknown key 'traing'; did you mean 'train'\?"),
    ("lora.dtype=float16", r"lora.dtype: 'float16' is not one of 'float32', 'bfloat16'"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, [override])


def test_cli_config_errors_are_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rank: [unclosed\n")
    result = subprocess.run([sys.executable, "-m", "qlora_jax.train", "--config", str(bad)], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {bad}: invalid YAML at line 3")
    missing = subprocess.run([sys.executable, "-m", "qlora_jax.train", "--set", "model.path=/nope", "--set",
                              f"train.out_dir={tmp_path}"], capture_output=True, text=True)
    assert missing.returncode == 2
    assert missing.stderr.strip() == ("error: model.path '/nope' is neither a directory, a Hugging Face repo id "
                                      "(owner/name) in the local cache, nor one of ['smollm2-135m-instruct']")


def test_peft_adapter_from_pytorch_gives_peft_logits(tmp_path):
    """An adapter trained with PyTorch PEFT loads onto our model and gives PEFT's logits; we write it back
    with PEFT's exact names, shapes and bytes."""
    adapter_dir = MODELS / "llama3_rope_peft_adapter"
    with np.load(MODELS / "reference_logits.npz") as reference:
        model = load_model(MODELS / "llama3_rope", quant="none", compute_dtype=jnp.float32,
                           lora=LoraConfig(rank=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "down_proj")))
        load_peft_adapter(model, adapter_dir)
        for pad in ("right", "left"):
            logits = np.asarray(model(jnp.asarray(reference[f"{pad}_ids"]), jnp.asarray(reference[f"{pad}_mask"])))
            real = reference[f"{pad}_mask"].astype(bool)
            assert np.abs(logits - reference[f"llama3_rope_peft/{pad}_logits"])[real].max() < 1e-4
    save_peft_adapter(model, tmp_path / "ours", "base")
    theirs = load_file(adapter_dir / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].shape == theirs[name].shape and ours[name].tobytes() == theirs[name].tobytes()
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")


def test_adapter_for_another_rank_is_refused(tmp_path):
    model = load_model(MODELS / "llama3_rope", quant="none", lora=LoraConfig(rank=8, targets=("q_proj",)))
    with pytest.raises(ValueError, match=r"rank 4, alpha 8, rslora False, dora False on .*; the model expects"):
        load_peft_adapter(model, MODELS / "llama3_rope_peft_adapter")


@pytest.mark.parametrize("source,path", [("hf_disk", FIXTURES / "hf_disk_alpaca"),
                                         ("tfds", FIXTURES / "alpaca_small.jsonl")])
def test_hf_disk_and_tfds_sources_read_the_same_examples_as_the_file(smollm2_dir, tmp_path, monkeypatch,
                                                                     source, path):
    """datasets.save_to_disk output (written by the real `datasets`) and a TFDS array_record preparation
    (tfds.data_source, no TensorFlow) give the same tokenized examples as the plain JSON Lines file."""
    monkeypatch.setenv("QLORA_JAX_CACHE", str(tmp_path))
    tokenizer = load_tokenizer(smollm2_dir)
    base = DataConfig(format="alpaca", path=str(FIXTURES / "alpaca_small.jsonl"), eval_size=4)
    expected = load_dataset(base, tokenizer, 0)
    got = load_dataset(DataConfig(format="alpaca", path=str(path), source=source, eval_size=4), tokenizer, 0)
    assert len(got.train) == len(expected.train) == 20
    for a, b in zip(got.train + got.eval, expected.train + expected.eval, strict=True):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_hf_disk_dataset_dict_trains_on_its_train_split(smollm2_dir, tmp_path):
    import datasets

    rows = [json.loads(line) for line in (FIXTURES / "alpaca_small.jsonl").read_text().splitlines()]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])}
                         ).save_to_disk(str(tmp_path / "dict"))
    tokenizer = load_tokenizer(smollm2_dir)
    got = load_dataset(DataConfig(format="alpaca", path=str(tmp_path / "dict"), source="hf_disk", eval_size=4),
                       tokenizer, 0)
    expected = load_dataset(DataConfig(format="alpaca", path=str(FIXTURES / "alpaca_small.jsonl"), eval_size=4),
                            tokenizer, 0)
    assert [e.input_ids.tolist() for e in got.train] == [e.input_ids.tolist() for e in expected.train]
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(DataError, match=r"no_train is a DatasetDict with splits \['validation'\]; qlora_jax trains "
                                        r"on its 'train' split"):
        load_dataset(DataConfig(format="alpaca", path=str(tmp_path / "no_train"), source="hf_disk"), tokenizer, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty is not a datasets\.save_to_disk directory"):
        load_dataset(DataConfig(format="alpaca", path=str(tmp_path / "empty"), source="hf_disk"), tokenizer, 0)


@pytest.mark.parametrize("path", sorted((FIXTURES.parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_run_config(path)
    assert config.train.batch_size % config.mesh.size == 0


def test_compiled_step_copies_no_activation_gradient_into_a_transposed_layout():
    """The LoRA weight gradients read the f32 output gradients ``[B, T, out]`` as they lie: XLA's CPU backend
    used to copy each one (gate/up after the SwiGLU backward, q/k/v/o/down) into a ``[out, B, T]`` layout
    every step, 29% of a SmolLM2 step. Only rank-sized ``[R, B, T]`` transposes may remain."""
    import optax
    from flax import nnx

    from qlora_jax.config import ModelConfig, QuantConfig
    from qlora_jax.loading import random_model
    from qlora_jax.lora import LoRAParam
    from qlora_jax.train import make_train_step

    config = ModelConfig("llama", 512, 64, 192, 2, 4, 2, 16)
    model = random_model(config, quant=QuantConfig("nf4"), lora=LoraConfig(rank=8), compute_dtype=jnp.float32,
                         remat="layer")
    graphdef, lora, frozen = nnx.split(model, LoRAParam, ...)
    tx = optax.adamw(1e-4)
    ids = jnp.zeros((1, 4, 32), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}
    text = make_train_step(graphdef, tx, donate=False).lower(lora, tx.init(lora), frozen, batch,
                                                            jax.random.key(0)).compile().as_text()
    moved = re.findall(r"= f32\[(\d+),4,32\]\{[\d,]+\} (?:transpose|copy)\(", text)
    assert moved and set(moved) == {"8"}, f"transposed [X, B, T] activations: {sorted(set(moved))}"


@pytest.mark.parametrize("remat", ["layer", "none", "layer_save_dots"])
def test_micro_batches_give_the_gradient_of_the_whole_batch(remat):
    """Two micro-batches of 2 sequences, one optimizer step: the same update as one batch of 4. With layer
    checkpointing the backward pass adds the second micro-batch's gradients into the first one's in
    place (``layer_scan``); the other policies add them afterwards."""
    import optax

    from qlora_jax.config import ModelConfig, QuantConfig
    from qlora_jax.loading import random_model
    from qlora_jax.train import make_train_step

    config = ModelConfig("llama", 128, 32, 64, 3, 4, 2, 8)
    model = random_model(config, quant=QuantConfig("nf4"), lora=LoraConfig(rank=4, dropout=0.0),
                         compute_dtype=jnp.float32, remat=remat)
    graphdef, lora, frozen = nnx.split(model, LoRAParam, ...)
    lora = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(jax.random.key(3), p.shape), lora)  # B != 0
    tx = optax.sgd(1.0)  # the update is minus the gradient
    ids = jax.random.randint(jax.random.key(1), (4, 16), 0, 128)
    labels = ids.at[:, :5].set(IGNORE).at[3].set(IGNORE)  # micro-batches with different target counts
    step = make_train_step(graphdef, tx, donate=False)

    def update(shape):
        batch = {"input_ids": ids.reshape(shape), "attention_mask": jnp.ones(shape, jnp.int32),
                 "labels": labels.reshape(shape)}
        new_lora, _, metrics = step(lora, tx.init(lora), frozen, batch, jax.random.key(0))
        return new_lora, metrics

    (whole, whole_metrics), (micro, micro_metrics) = update((1, 4, 16)), update((2, 2, 16))
    assert int(micro_metrics["target_tokens"]) == int(whole_metrics["target_tokens"]) == 3 * 11
    np.testing.assert_allclose(float(micro_metrics["loss"]), float(whole_metrics["loss"]), rtol=1e-6)
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(jax.tree.leaves(whole),
                                                                           jax.tree.leaves(lora), strict=True)]
    assert min(moved) > 0  # every adapter matrix has a gradient
    for a, b in zip(jax.tree.leaves(micro), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
