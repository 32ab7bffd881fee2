"""Reliability: bad input fails in one line with exit 2 and writes nothing; kill -9, SIGTERM and Ctrl-C
at any point resume to the uninterrupted result; non-finite steps are skipped; a full disk is reported."""

import ctypes
import dataclasses
import errno
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import adapter_bytes, train_config, write_tiny_chat_model
from flax import nnx

from qlora_jax import train as train_module
from qlora_jax.checkpoint import Checkpoints
from qlora_jax.config import LoraConfig, ModelConfig, QuantConfig
from qlora_jax.config_io import dump_run_config, load_run_config
from qlora_jax.loading import random_model
from qlora_jax.lora import LoRAParam
from qlora_jax.peft import save_peft_adapter
from qlora_jax.safetensors_io import load_file, save_file
from qlora_jax.train import main, make_train_step, train

RUNNER = Path(__file__).parent / "crash_runner.py"

CHAT_ROW = {"messages": [{"role": "user", "content": "What is 1 plus 2?"},
                         {"role": "assistant", "content": "1 plus 2 is 3."}]}


@pytest.fixture
def inputs(tmp_path, tiny_chat_model, chat_file):
    """A private copy of the tiny model and chat data, and the run directory a run would create."""
    model = tmp_path / "model"
    shutil.copytree(tiny_chat_model, model)
    data = tmp_path / "chat.jsonl"
    shutil.copy(chat_file, data)
    return {"model": model, "data": data, "out": tmp_path / "runs", "tmp": tmp_path}


def _argv(inputs, *overrides: str, config: Path | None = None) -> list[str]:
    settings = {"model.path": inputs["model"], "data.format": "chat", "data.path": inputs["data"],
                "data.max_len": 64, "data.eval_size": 8, "lora.rank": 4, "train.batch_size": 4, "train.steps": 2,
                "train.out_dir": inputs["out"], "train.run_name": "run"}
    argv = ["--config", str(config)] if config else []
    for key, value in settings.items():
        argv += ["--set", f"{key}={value}"]
    for override in overrides:
        argv += ["--set", override]
    return argv


# --- bad input: each case changes the valid inputs, then names what the one-line error must say -----

def _yaml(text):
    def make(inputs):
        path = inputs["tmp"] / "bad.yaml"
        path.write_text(text)
        return {"config": path}
    return make


def _set(*overrides):
    return lambda inputs: {"overrides": overrides}


def _edit_json(name, change):
    def make(inputs):
        path = inputs["model"] / name
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
        return {}
    return make


def _remove(name):
    def make(inputs):
        (inputs["model"] / name).unlink()
        return {}
    return make


def _write_model_file(name, content: bytes):
    def make(inputs):
        (inputs["model"] / name).write_bytes(content)
        return {}
    return make


def _mangle_weights(change):
    def make(inputs):
        path = inputs["model"] / "model.safetensors"
        path.write_bytes(change(path.read_bytes()))
        return {}
    return make


def _header(raw: bytes) -> tuple[dict, bytes]:
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _with_header(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def _retarget_first_tensor(**entry):
    def change(raw):
        header, data = _header(raw)
        name = sorted(k for k in header if k != "__metadata__")[0]
        header[name].update(entry)
        return _with_header(header, data)
    return change


def _shard_index(weight_map):
    def make(inputs):
        (inputs["model"] / "model.safetensors").unlink()
        (inputs["model"] / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return {}
    return make


def _pickle_only(inputs):
    (inputs["model"] / "model.safetensors").unlink()
    (inputs["model"] / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    return {}


def _data(text):
    def make(inputs):
        inputs["data"].write_text(text)
        return {}
    return make


def _adapter(rank=4, alpha=8.0, corrupt_config=False, intermediate_size=None, nan=False):
    def make(inputs):
        config = ModelConfig.from_hf_dict(json.loads((inputs["model"] / "config.json").read_text()))
        if intermediate_size:  # an adapter trained on a differently shaped base model
            config = dataclasses.replace(config, intermediate_size=intermediate_size)
        model = random_model(config, quant=QuantConfig("none"), lora=LoraConfig(rank=rank, alpha=alpha), seed=2)
        adapter = save_peft_adapter(model, inputs["tmp"] / "adapter", "tiny")
        if corrupt_config:
            (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
        if nan:  # one value of one tensor, as a diverged run would have saved it
            tensors = load_file(adapter / "adapter_model.safetensors")
            name = sorted(tensors)[3]
            tensors[name] = tensors[name].copy()
            tensors[name].flat[5] = np.nan
            save_file(tensors, adapter / "adapter_model.safetensors")
        return {"overrides": [f"model.adapter={adapter}", f"lora.alpha={8.0}"]}
    return make


def _existing_run(*changes: str, step: int = 2):
    """A run directory as this command's earlier run left it (its config, a checkpoint of ``step``); the new run
    differs by ``changes``."""
    def make(inputs):
        run_dir = inputs["out"] / "run"
        run_dir.mkdir(parents=True)
        dump_run_config(load_run_config(None, [a for a in _argv(inputs) if a != "--set"]), run_dir / "config.yaml")
        checkpoints = Checkpoints(run_dir, 1)
        checkpoints.save(step, {"lora": np.zeros(4, np.float32)}, {"step": step})
        checkpoints.close()
        return {"overrides": list(changes)}
    return make


def _truncated_checkpoint(inputs):
    """A finished 2-step run whose step-2 checkpoint files were cut to half their size."""
    assert main(_argv(inputs)) == 0
    files = [p for p in (inputs["out"] / "run" / "checkpoints" / "step_2").rglob("*") if p.is_file()
             and p.stat().st_size > 64]
    for path in files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return {}


def _out_dir_is_a_file(inputs):
    path = inputs["tmp"] / "a_file"
    path.write_text("")
    return {"overrides": [f"train.out_dir={path}"], "run_dir": path / "run"}


def _empty_assistant(inputs):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    inputs["data"].write_text(json.dumps(row) + "\n")
    return {}


BAD_INPUTS = [
    # YAML and config structure
    ("yaml syntax", _yaml("model: [unclosed\n"), r"bad\.yaml: invalid YAML"),
    ("yaml tab indent", _yaml("model:\n\tpath: x\n"), r"bad\.yaml: invalid YAML"),
    ("yaml not a mapping", _yaml("- model\n- quant\n"), r"bad\.yaml: the top level must be a mapping"),
    ("config file missing", lambda i: {"config": i["tmp"] / "nope.yaml"}, r"config file .*nope\.yaml does not exist"),
    ("unknown section", _yaml("modle:\n  path: x\n"), r"unknown key 'modle'.*did you mean 'model'"),
    ("unknown key", _yaml("lora:\n  rnak: 4\n"),
     r"bad\.yaml with --set: unknown key 'lora\.rnak'; did you mean 'rank'"),
    ("unknown --set key", _set("train.stepz=3"), r"--set: unknown key 'train\.stepz'; did you mean 'steps'"),
    ("--set without =", _set("train.steps"), r"--set 'train\.steps': expected section\.key=value"),
    ("--set not a section", _set("steps=3"), r"--set: unknown key 'steps'; known keys: model, quant"),
    # wrong types
    ("steps not an integer", _set("train.steps=ten"), r"train\.steps.*expected an integer"),
    ("rank a float", _set("lora.rank=1.5"), r"lora\.rank.*expected an integer"),
    ("double_quant not bool", _set("quant.double_quant=maybe"), r"quant\.double_quant.*expected true or false"),
    ("lr not a number", _set("optimizer.lr=fast"), r"optimizer\.lr.*expected a number"),
    ("targets not a list", _yaml("lora:\n  targets: 7\n"), r"lora\.targets.*expected a list"),
    # impossible values
    ("zero steps", _set("train.steps=0"), r"train\.steps=0 must be an integer >= 1"),
    ("negative batch", _set("train.batch_size=-1"), r"train\.batch_size=-1 must be an integer >= 1"),
    ("zero rank", _set("lora.rank=0"), r"lora\.rank"),
    ("dropout above 1", _set("lora.dropout=1.5"), r"lora\.dropout"),
    ("blocksize 48", _set("quant.blocksize=48"), r"quant\.blocksize=48 must be one of"),
    ("quant type nf3", _set("quant.quant_type=nf3"), r"quant\.quant_type.*'nf3'"),
    ("kernel name", _set("quant.kernel=cuda"), r"quant\.kernel.*'cuda'"),
    ("negative lr", _set("optimizer.lr=-1"), r"optimizer\.lr"),
    ("run name with slash", _set("train.run_name=a/b"), r"train\.run_name='a/b' must be a non-empty name"),
    ("unknown lora target", _set("lora.targets=[q_proj, lm_head]"), r"lora\.targets.*lm_head"),
    ("mesh axis zero", _set("mesh.fsdp=0"), r"mesh\.fsdp=0 must be an integer >= 1"),
    ("mesh larger than the devices", _set("mesh.data=3"),
     r"mesh: data=3 x fsdp=1 = 3 devices, but this run has 8 \(1 process\(es\)\); set mesh\.data x mesh\.fsdp = 8"),
    ("batch not a multiple of the mesh", _set("mesh.fsdp=8"),
     r"train\.batch_size=4 must be a multiple of mesh\.data x mesh\.fsdp = 8"),
    # model directory
    ("model dir missing", _set("model.path=/nonexistent/model"), r"model\.path '/nonexistent/model' is neither"),
    ("model path is a file", lambda i: {"overrides": [f"model.path={i['data']}"]}, r"chat\.jsonl' is neither"),
    ("config.json missing", _remove("config.json"), r"has no config\.json"),
    ("config.json not JSON", _write_model_file("config.json", b"{oops"), r"config\.json: not valid JSON"),
    ("unsupported model_type", _edit_json("config.json", lambda c: c.update(model_type="gpt2")),
     r"config\.json: model_type='gpt2' is not supported; supported: llama"),
    ("config lacks hidden_size", _edit_json("config.json", lambda c: c.pop("hidden_size")),
     r"config\.json.*hidden_size"),
    ("tokenizer missing", _remove("tokenizer.json"), r"has no tokenizer\.json or tokenizer\.model"),
    ("tokenizer corrupt", _write_model_file("tokenizer.json", b"{}"), r"tokenizer\.json: cannot be read"),
    ("config/weights shape mismatch", _edit_json("config.json", lambda c: c.update(intermediate_size=256)),
     r"has shape \(128, 64\) but config\.json implies \(256, 64\)"),
    ("weights lack a layer", _edit_json("config.json", lambda c: c.update(num_hidden_layers=3)),
     r"checkpoint lacks 9 tensor\(s\) config\.json implies"),
    ("truncated safetensors", _mangle_weights(lambda raw: raw[: len(raw) // 2]),
     r"model\.safetensors: not a valid safetensors file: .*(incomplete|invalid header length)"),
    ("safetensors header not JSON", _mangle_weights(lambda raw: struct.pack("<Q", 4) + b"{no}" + raw[12:]),
     r"model\.safetensors: not a valid safetensors file: .*invalid JSON in header"),
    ("absurd header length", _mangle_weights(lambda raw: struct.pack("<Q", 1 << 60) + raw[8:]),
     r"model\.safetensors: not a valid safetensors file: .*header too large"),
    ("offsets outside the file", _mangle_weights(_retarget_first_tensor(data_offsets=[0, 1 << 40])),
     r"model\.safetensors: not a valid safetensors file: .*invalid shape, data type, or offset for tensor"),
    ("unsupported dtype", _mangle_weights(_retarget_first_tensor(dtype="X9")),
     r"model\.safetensors: not a valid safetensors file: .*unknown variant `X9`"),
    ("empty safetensors file", _write_model_file("model.safetensors", b""),
     r"model\.safetensors: not a valid safetensors file: .*header too small"),
    ("index names a missing shard", _shard_index({"model.norm.weight": "model-00001.safetensors"}),
     r"index\.json lists shards that do not exist: \['model-00001\.safetensors'\]"),
    ("index escapes the directory", _shard_index({"model.norm.weight": "../../etc/passwd"}),
     r"shard path '\.\./\.\./etc/passwd' points outside"),
    ("pickle checkpoint", _pickle_only, r"holds only pickle checkpoints \['pytorch_model\.bin'\]; .*never unpickles"),
    # data
    ("data file missing", _set("data.path=/nonexistent/data.jsonl"), r"/nonexistent/data\.jsonl"),
    ("data path is a directory", lambda i: {"overrides": [f"data.path={i['tmp']}"]},
     r"data\.path .* is a directory; data\.source: file reads a \.json or \.jsonl file \(a datasets "
     r"save_to_disk directory needs data\.source: hf_disk\)"),
    ("bad JSON line", _data(json.dumps(CHAT_ROW) + "\n{not json\n"),
     r"chat\.jsonl:2: invalid JSON on line 2, column 2: Expecting property name enclosed in double quotes$"),
    ("unterminated JSON string", _data('{"messages": [{"role": "user", "content": "hi}]}\n'),
     r"chat\.jsonl:1: invalid JSON on line 1, column 43: Unterminated string starting at$"),
    ("record not an object", _data("[1, 2]\n"), r"chat\.jsonl\[0\]: expected a JSON object, got int"),
    ("missing messages", _data(json.dumps({"text": "hi"}) + "\n"), r"chat\.jsonl:1: field 'messages'"),
    ("content wrong type", _data(json.dumps({"messages": [{"role": "user", "content": 5}]}) + "\n"),
     r"chat\.jsonl:1: .*content.* must be a string, got int"),
    ("empty content", _empty_assistant, r"chat\.jsonl:1: messages\[1\]: field 'content' is empty"),
    ("no assistant turn", _data(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"),
     r"chat\.jsonl:1: no assistant message to learn from"),
    ("empty data file", _data(""), r"chat\.jsonl: 0 usable examples"),
    ("all examples too long", lambda i: {"overrides": ["data.max_len=4"]}, r"chat\.jsonl: 0 usable examples"),
    # adapters, resume, output
    ("adapter of another rank", _adapter(rank=8), r"adapter has rank 8, alpha 8.*the model expects"),
    ("adapter config broken", _adapter(corrupt_config=True), r"adapter_config\.json: missing key 'r'"),
    ("adapter dir missing", _set("model.adapter=/nonexistent/adapter"), r"/nonexistent/adapter has no adapter_config"),
    ("adapter of another base model", _adapter(intermediate_size=96),
     r"has shape .* the model expects .*different base model"),
    ("adapter holding NaN", _adapter(nan=True),
     r"adapter_model\.safetensors: tensor '.*\.weight' holds 1 NaN/Inf values"),
    # resuming: the inputs first, then what the existing run allows (resume.py), then its checkpoint
    ("resume with another lora rank", _existing_run("lora.rank=8"),
     r"run holds a run trained with lora\.rank=4, this run has lora\.rank=8: .*adapters of that shape.*keep "
     r"lora\.rank=4 to resume, or to start over instead, use --set train\.run_name=NEW_NAME or delete .*run$"),
    ("resume with another seed", _existing_run("train.seed=1"),
     r"trained with train\.seed=0, this run has train\.seed=1: .*held-out split"),
    ("resume with another batch size", _existing_run("train.batch_size=2"),
     r"trained with train\.batch_size=4, this run has train\.batch_size=2: .*saved data position"),
    ("resume with another learning rate", _existing_run("optimizer.lr=0.001"),
     r"trained with optimizer\.lr=0\.0002, this run has optimizer\.lr=0\.001: .*learning-rate schedule"),
    ("resume with fewer steps than the checkpoint", _existing_run(step=4),
     r"train\.steps=2 is smaller than step 4 of the checkpoint in .*run; set train\.steps >= 4"),
    ("bad model.path beside an existing run", _existing_run("model.path=/nonexistent/model"),
     r"model\.path '/nonexistent/model' is neither"),
    ("checkpoint of the per-layer layout", _existing_run(),
     r"run/checkpoints/step_2 holds one entry per decoder layer, the layout of qlora_jax 0\.1; this version stores "
     r"the layers stacked and cannot resume it: use --set train\.run_name=NEW_NAME to start over"),
    ("truncated checkpoint files", _truncated_checkpoint,
     r"run/checkpoints/step_2 cannot be restored \(.*\); delete that directory to resume from the checkpoint "
     r"before it"),
    ("--resume without checkpoint", lambda i: {"argv": ["--resume"]}, r"--resume: .* has no checkpoint to resume"),
    ("out_dir is a file", _out_dir_is_a_file, r"train\.out_dir: .*a_file is not a directory"),
]


@pytest.mark.parametrize("make", [case[1] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(make, inputs, capsys):
    message = dict((id(c[1]), c[2]) for c in BAD_INPUTS)[id(make)]
    setup = make(inputs)
    run_dir = setup.get("run_dir", inputs["out"] / "run")
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) if run_dir.exists() else None
    capsys.readouterr()
    argv = _argv(inputs, *setup.get("overrides", ()), config=setup.get("config")) + setup.get("argv", [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(message, err), err
    after = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) if run_dir.exists() else None
    assert after == before  # nothing written (a resumed run's directory is unchanged)


def test_there_are_at_least_40_bad_inputs():
    assert len(BAD_INPUTS) >= 40


# --- crashes -------------------------------------------------------------------------------------------

def _run_cli(point: str, count: int, argv: list[str], cache: Path, devices: int = 8) -> subprocess.CompletedProcess:
    """The training CLI in a fresh process that dies at ``point``; compiled steps are shared through ``cache``."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(RUNNER), point, str(count), *argv], capture_output=True, text=True,
                          env=env, timeout=600)


CRASH_OVERRIDES = ["train.steps=8", "train.save_every=2", "train.eval_every=4", "train.eval_batches=2",
                   "optimizer.lr=0.01", "lora.dropout=0.1", "train.grad_accum=2"]
# (kill point, count in this process, exit status, newest checkpoint afterwards): each point fires, in an order
# where each run resumes from what the one before left (save_every=2, 8 steps).
CRASH_SCHEDULE = [
    ("step", 2, -9, None),   # killed after step 2 returns, before its checkpoint: nothing to resume
    ("save", 1, -9, None),   # killed inside the step-2 save: orbax's temporary directory is left
    ("sigterm", 1, 143, 1),  # SIGTERM after step 1: a checkpoint of step 1 on the way out
    ("sigint", 1, 130, 2),   # resumed at 1; Ctrl-C after step 2, which was a save step anyway
    ("export", 1, -9, 8),    # resumed at 2, trained to 8, killed inside the adapter export
    ("none", 0, 0, 8),       # resumed at 8: writes the adapter
]


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


@pytest.mark.slow
def test_every_kill_point_fires_and_the_reruns_reach_the_uninterrupted_adapter(inputs):
    argv = _argv(inputs, *CRASH_OVERRIDES)
    assert main(argv + ["--set", "train.run_name=straight"]) == 0
    straight, run_dir, cache = inputs["out"] / "straight", inputs["out"] / "run", inputs["tmp"] / "jax_cache"
    for point, count, status, newest in CRASH_SCHEDULE:
        complete = train_module.latest_checkpoint(run_dir) if run_dir.exists() else None
        result = _run_cli(point, count, argv, cache)
        assert result.returncode == status, (point, result.returncode, result.stderr[-2000:])
        assert train_module.latest_checkpoint(run_dir) == newest, point
        if complete is not None:  # it resumed from the newest complete checkpoint, never a partial one
            assert f"resumed from {run_dir}/checkpoints/step_{complete}" in result.stdout, result.stdout
        if point == "save":
            assert list((run_dir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))  # died mid-save
        if point in ("sigterm", "sigint"):
            assert "run the same command again to resume" in result.stderr.splitlines()[-1]
        if point == "export":
            assert not (run_dir / "adapter").exists() and (run_dir / "adapter.partial").is_dir()
    assert adapter_bytes(run_dir) == adapter_bytes(straight)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_eval_loss"] == json.loads((straight / "summary.json").read_text())["final_eval_loss"]
    # TensorBoard shows every step once, with the values of the uninterrupted run (points logged after a
    # checkpoint by a killed process are purged by the resumed one).
    for tag in ("loss", "eval_loss"):
        assert _scalars(run_dir, tag) == _scalars(straight, tag), tag
    assert [s for s, _ in _scalars(run_dir, "loss")] == list(range(1, 9))


@pytest.mark.slow
@pytest.mark.parametrize(("case", "overrides", "devices"), [
    ("offload", ["optimizer.offload=host"], 8),
    ("mesh", ["mesh.data=2"], 2),
])
def test_a_kill_inside_a_save_resumes_to_the_same_adapter(inputs, case, overrides, devices):
    """With the optimizer state in host memory, and on a 2-device mesh, against an uninterrupted run of each."""
    cache = inputs["tmp"] / "jax_cache"
    argv = _argv(inputs, *CRASH_OVERRIDES, *overrides)
    straight, run_dir = inputs["out"] / "straight", inputs["out"] / "run"
    assert _run_cli("none", 0, argv + ["--set", "train.run_name=straight"], cache, devices).returncode == 0
    killed = _run_cli("save", 2, argv, cache, devices)  # the second save of the run: step 4
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert train_module.latest_checkpoint(run_dir) == 2
    assert list((run_dir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
    rerun = _run_cli("none", 0, argv, cache, devices)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resumed from {run_dir}/checkpoints/step_2" in rerun.stdout
    assert adapter_bytes(run_dir) == adapter_bytes(straight)


def test_a_conversion_killed_midway_leaves_nothing_a_later_run_picks_up(inputs, smollm2_dir, monkeypatch):
    """SIGKILL during the first-use conversion of the built-in model; the next use converts it whole."""
    cache = inputs["tmp"] / "model_cache"
    monkeypatch.setenv("QLORA_JAX_CACHE", str(cache))
    argv = [a.replace(str(inputs["model"]), "smollm2-135m-instruct") for a in _argv(inputs)]
    killed = _run_cli("convert", 1, argv, inputs["tmp"] / "jax_cache")
    assert killed.returncode == -9, killed.stderr[-2000:]
    target = cache / "SmolLM2-135M-Instruct"
    [partial] = cache.glob("SmolLM2-135M-Instruct.partial-*")  # model.safetensors written, the rest not
    assert (partial / "model.safetensors").is_file() and not (partial / "config.json").exists()
    assert not target.exists()
    from qlora_jax.assets import prepared_smollm2

    assert prepared_smollm2(verbose=False) == target
    assert not list(cache.glob("SmolLM2-135M-Instruct.partial-*"))  # the dead conversion's files are removed
    for name in ("config.json", "tokenizer.json", "model.safetensors", ".converted"):
        assert (target / name).read_bytes() == (smollm2_dir / name).read_bytes(), name


# --- non-finite steps, full disks ---------------------------------------------------------------------

@pytest.mark.parametrize("offload", ["none", "host"])
def test_a_non_finite_step_is_skipped_and_leaves_the_state_unchanged(offload):
    config = ModelConfig(model_type="llama", vocab_size=32, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    model = random_model(config, quant=QuantConfig("nf4", 64, True), lora=LoraConfig(rank=4, dropout=0.0),
                         compute_dtype=jnp.float32)
    model.embed_tokens.set_value(model.embed_tokens[...].at[7].set(jnp.nan))  # token 7 poisons a batch
    graphdef, lora, frozen = nnx.split(model, LoRAParam, ...)
    tx = optax.adam(0.1)
    opt_state = tx.init(lora)
    if offload == "host":  # the update runs layer by layer (qlora_jax.offload)
        opt_state = jax.device_put(opt_state, jax.memory.Space.Host)
    step = make_train_step(graphdef, tx, donate=False, offload=offload)
    good = jnp.array([[[1, 2, 3, 4]]])
    bad = jnp.array([[[1, 7, 3, 4]]])

    def batch(ids):
        return {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}

    new_lora, new_opt, metrics = step(lora, opt_state, frozen, batch(bad), jax.random.key(0))
    assert not bool(metrics["applied"]) and not np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves((new_lora, new_opt)), jax.tree.leaves((lora, opt_state)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    new_lora, _, metrics = step(lora, opt_state, frozen, batch(good), jax.random.key(0))
    assert bool(metrics["applied"]) and np.isfinite(float(metrics["loss"]))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_lora), jax.tree.leaves(lora),
                                                         strict=True))


def test_non_finite_steps_in_a_row_stop_the_run_and_no_checkpoint_holds_nan(inputs, smollm2_dir, capsys):
    write_tiny_chat_model(inputs["model"], smollm2_dir, nan_embeddings=True)
    assert main(_argv(inputs, "train.steps=10", "train.save_every=2", "train.max_bad_steps=3")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "error: 3 steps in a row (through step 3) had a non-finite loss or gradient" in err
    assert "train.max_bad_steps=3" in err and "the newest is step 2" in err
    run_dir = inputs["out"] / "run"
    assert train_module.latest_checkpoint(run_dir) == 2
    restored = ocp.StandardCheckpointer().restore((run_dir / "checkpoints" / "step_2" / "state").absolute())
    floats = [np.asarray(x) for x in jax.tree.leaves(restored) if np.asarray(x).dtype.kind == "f"]
    assert len(floats) > 10 and all(np.isfinite(x).all() for x in floats)


def test_too_little_disk_space_is_reported_before_training(inputs, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(train_module.shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 1 << 20))
    assert main(_argv(inputs)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.out_dir: ") and "has 1 MiB free; checkpoints and the adapter need" in err
    assert not (inputs["out"] / "run").exists()


def test_a_failed_checkpoint_write_stops_cleanly_and_keeps_the_previous_one(inputs, monkeypatch, capsys):
    save = Checkpoints.save
    calls = []

    def failing_save(self, step, state, meta):
        calls.append(step)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save(self, step, state, meta)

    monkeypatch.setattr(Checkpoints, "save", failing_save)
    assert main(_argv(inputs, "train.steps=6", "train.save_every=2")) == 1
    err = capsys.readouterr().err
    assert ("could not write checkpoint step 4" in err and "No space left on device" in err
            and "the previous checkpoint (step 2) is intact" in err)
    assert train_module.latest_checkpoint(inputs["out"] / "run") == 2
    monkeypatch.setattr(Checkpoints, "save", save)
    assert main(_argv(inputs, "train.steps=6", "train.save_every=2")) == 0  # rerun resumes and finishes
    assert (inputs["out"] / "run" / "adapter" / "adapter_model.safetensors").is_file()


# --- load ----------------------------------------------------------------------------------------------

def _live_rss_mib() -> float:
    """Resident MiB after glibc hands its free heap pages back, so the count follows live memory
    rather than how earlier tests in the same process left the allocator's arenas."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_soak_250_steps_memory_and_step_time_stay_flat(inputs, monkeypatch):
    """Step time is the step's CPU time (all threads): on a shared machine another tenant can halve
    the cores a step gets mid-run, which doubles its wall time without any change in its work."""
    samples = []  # (step, live rss MiB, wall seconds, cpu seconds of the step)
    make = train_module.make_train_step

    def instrumented(*args, **kwargs):
        step = make(*args, **kwargs)

        def run(*a):
            wall, cpu = time.perf_counter(), time.process_time()
            out = step(*a)
            jax.block_until_ready(out)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            samples.append((len(samples) + 1, _live_rss_mib(), wall, cpu))
            return out

        run._cache_size = step._cache_size
        return run

    monkeypatch.setattr(train_module, "make_train_step", instrumented)
    config = train_config(inputs["model"], inputs["data"], inputs["out"] / "soak",
                          **{"train.steps": 250, "train.save_every": 10, "train.eval_every": 0,
                             "train.log_every": 50, "train.grad_accum": 1, "train.batch_size": 2})
    train(config, log=lambda *_: None)
    assert len(samples) == 250
    rss, wall, cpu = (np.array([s[i] for s in samples]) for i in (1, 2, 3))
    growth = rss[200:].mean() - rss[50:100].mean()
    drift = np.median(cpu[200:]) / np.median(cpu[50:100])
    print(f"soak: live RSS {rss[50]:.0f} -> {rss[-1]:.0f} MiB (growth {growth:.1f} MiB from steps 50-100 to "
          f"200-250); median step CPU {np.median(cpu[50:100]) * 1e3:.1f} -> {np.median(cpu[200:]) * 1e3:.1f} ms, "
          f"wall {np.median(wall[50:100]) * 1e3:.1f} -> {np.median(wall[200:]) * 1e3:.1f} ms")
    assert growth < 40, f"live RSS grew {growth:.1f} MiB over 150 steps with 15 checkpoints"
    assert drift < 1.5, f"step CPU time drifted up {drift:.2f}x"
    assert Checkpoints(inputs["out"] / "soak", 2).latest_step() == 250
