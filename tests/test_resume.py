"""Resume: which settings may change (qlora_jax.resume), each refusal one line naming the key and both values."""

import re
from pathlib import Path

import pytest

from qlora_jax.config_io import ConfigError, dump_run_config, load_run_config, to_plain_dict
from qlora_jax.resume import REFUSED, RESUMABLE, _flat, check_resume, refusal_reason

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def run_dir(tmp_path):
    """A run directory whose run used the default settings (constant schedule) and reached step 4."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dump_run_config(load_run_config(None, []), run_dir / "config.yaml")
    return run_dir


@pytest.mark.parametrize("override", ["quant.kernel=pallas", "train.eval_every=5", "train.save_every=7",
                                      "train.steps=300", "optimizer.offload=host", "mesh.data=2",
                                      "train.loss_chunk=0", "train.log_every=3"])
def test_resume_allows_settings_that_keep_the_checkpoint_meaning(run_dir, override):
    check_resume(run_dir, load_run_config(None, [override]), checkpoint_step=4)


@pytest.mark.parametrize(("override", "key", "old", "new", "why"), [
    ("train.seed=1", "train.seed", "0", "1", "held-out split"),
    ("train.batch_size=4", "train.batch_size", "8", "4", "saved data position"),
    ("train.grad_accum=2", "train.grad_accum", "1", "2", "saved data position"),
    ("data.eval_size=32", "data.eval_size", "64", "32", "saved data position"),
    ("optimizer.lr=0.001", "optimizer.lr", "0.0002", "0.001", "learning-rate schedule"),
    ("optimizer.schedule=cosine", "optimizer.schedule", "'constant'", "'cosine'", "learning-rate schedule"),
    ("quant.blocksize=128", "quant.blocksize", "64", "128", "quantized base"),
    ("lora.rank=8", "lora.rank", "64", "8", "adapters of that shape"),
    ("lora.dtype=bfloat16", "lora.dtype", "'float32'", "'bfloat16'", "adapters of that precision"),
    ("model.path=/elsewhere", "model.path", "'smollm2-135m-instruct'", "'/elsewhere'", "base model"),
])
def test_resume_refuses_other_settings_naming_key_and_both_values(run_dir, override, key, old, new, why):
    with pytest.raises(ConfigError) as info:
        check_resume(run_dir, load_run_config(None, [override]), checkpoint_step=4)
    message = str(info.value)
    assert "\n" not in message
    assert f"trained with {key}={old}, this run has {key}={new}" in message and why in message
    assert "--set train.run_name=NEW_NAME" in message and f"keep {key}={old} to resume" in message


def test_steps_may_change_only_under_a_constant_schedule(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dump_run_config(load_run_config(None, ["optimizer.schedule=cosine"]), run_dir / "config.yaml")
    with pytest.raises(ConfigError, match=r"train\.steps=100, this run has train\.steps=200.*cosine schedule's curve"):
        check_resume(run_dir, load_run_config(None, ["optimizer.schedule=cosine", "train.steps=200"]), 4)


def test_steps_below_the_checkpoint_are_refused(run_dir):
    with pytest.raises(ConfigError, match=r"train\.steps=3 is smaller than step 4 of the checkpoint in .*run; set "
                                          r"train\.steps >= 4"):
        check_resume(run_dir, load_run_config(None, ["train.steps=3"]), checkpoint_step=4)


def test_several_changes_are_named_in_the_one_line(run_dir):
    with pytest.raises(ConfigError, match=r"train\.batch_size=8.*\(also changed: train\.seed\)"):
        check_resume(run_dir, load_run_config(None, ["train.seed=1", "train.batch_size=4"]), checkpoint_step=4)


def test_every_config_key_is_classified_and_in_the_readme_table():
    keys = _flat(to_plain_dict(load_run_config(None, [])))
    readme = README.read_text()
    for key in keys:
        assert key in RESUMABLE or refusal_reason(key) != "it changes what the checkpoint means", key
    for key in list(RESUMABLE) + [k for k in REFUSED if "." in k]:
        assert re.search(rf"^ *\| `{re.escape(key)}` \|", readme, re.M), f"README's resume table lacks {key}"
    for section in [k for k in REFUSED if "." not in k]:
        assert re.search(rf"^ *\| `{section}\.\*` \|", readme, re.M), f"README's resume table lacks {section}.*"
