"""Model sources: built-in names, directories, and repo ids resolved offline from a Hugging Face cache.

The cache is built in the layout huggingface_hub writes (``models--owner--name/blobs/<hash>``,
``snapshots/<commit>/<file>`` symlinked into ``blobs/``, ``refs/<branch>``) and read through
huggingface_hub itself, with a sharded checkpoint, so the symlinks are exercised.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.cli import model_source
from qlora_jax.loading import load_for_inference, load_model
from qlora_jax.model_source import adapter_base_model, compute_dtype, resolve_model_dir
from qlora_jax.safetensors_io import load_file, save_file

TINY = Path(__file__).resolve().parent / "fixtures" / "models" / "llama3_rope"
MAIN, TAGGED = "a" * 40, "b" * 40


def _add_snapshot(repo: Path, commit: str, files: dict[str, bytes]) -> None:
    """Store ``files`` as blobs and link them from ``snapshots/<commit>/``, as huggingface_hub does."""
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def _sharded_files(source: Path, tmp_path: Path) -> dict[str, bytes]:
    tensors = load_file(source / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    files = {}
    for index, part in enumerate((names[:half], names[half:]), start=1):
        save_file({n: tensors[n] for n in part}, tmp_path / "shard")
        files[f"model-0000{index}-of-00002.safetensors"] = (tmp_path / "shard").read_bytes()
    weight_map = {n: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, n in enumerate(names)}
    files["model.safetensors.index.json"] = json.dumps({"weight_map": weight_map}).encode()
    for path in source.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            files[path.name] = path.read_bytes()
    return files


@pytest.fixture
def hub_cache(tmp_path, tiny_chat_model, monkeypatch):
    """A Hugging Face cache holding ``tiny/chat`` (main: sharded tiny chat model) and a ``v1`` tag of
    another model (llama3_rope), with huggingface_hub pointed at it."""
    cache = tmp_path / "hub"
    repo = cache / "models--tiny--chat"
    _add_snapshot(repo, MAIN, _sharded_files(tiny_chat_model, tmp_path))
    tokenizer = {p.name: p.read_bytes() for p in tiny_chat_model.iterdir() if p.name.startswith("tokenizer")}
    _add_snapshot(repo, TAGGED, {**tokenizer, **{p.name: p.read_bytes() for p in TINY.iterdir() if p.is_file()}})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(TAGGED)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_auto_compute_dtype_is_bf16_but_for_a_16_bit_base_generating_on_a_cpu():
    """README, "Against the PyTorch stack": bf16 trains faster everywhere and, from a 4-bit base on a CPU, reads
    prompts faster and decodes as fast (two 16-bit values per decoded word); a 16-bit base decodes faster in f32
    there."""
    assert compute_dtype("auto") == jnp.bfloat16
    assert compute_dtype("auto", training=False, quantized=True) == jnp.bfloat16
    on_cpu = jax.default_backend() == "cpu"
    assert compute_dtype("auto", training=False, quantized=False) == (jnp.float32 if on_cpu else jnp.bfloat16)
    assert compute_dtype("float32", training=True) == jnp.float32
    assert compute_dtype("bfloat16", training=False, quantized=False) == jnp.bfloat16


def test_repo_id_resolves_to_the_cached_snapshot_and_its_symlinked_shards_load(hub_cache, tiny_chat_model):
    directory = resolve_model_dir("tiny/chat")
    assert directory == hub_cache / "models--tiny--chat" / "snapshots" / MAIN
    assert (directory / "model-00001-of-00002.safetensors").is_symlink()
    from_cache = load_model(directory, quant="nf4")
    from_directory = load_model(tiny_chat_model, quant="nf4")
    np.testing.assert_array_equal(np.asarray(from_cache.layer(1).mlp.down_proj.packed[...]),
                                  np.asarray(from_directory.layer(1).mlp.down_proj.packed[...]))


def test_revision_selects_another_snapshot(hub_cache):
    assert resolve_model_dir("tiny/chat", revision="v1") == hub_cache / "models--tiny--chat" / "snapshots" / TAGGED
    assert resolve_model_dir("tiny/chat", revision=TAGGED).name == TAGGED
    model, tokenizer = load_for_inference("tiny/chat", revision="v1")
    assert model.config.hidden_size == 64 and model.config.vocab_size == 256  # llama3_rope, not the chat model
    assert tokenizer.vocab_size == 49152


def test_missing_repo_says_where_it_looked_and_how_to_download(hub_cache):
    with pytest.raises(FileNotFoundError, match=rf"--model 'meta-llama/Llama-2-7b-hf' is not a local directory and "
                                                rf"not in the Hugging Face cache {hub_cache}.*never downloads: fetch "
                                                r"it once with `hf download meta-llama/Llama-2-7b-hf`"):
        resolve_model_dir("meta-llama/Llama-2-7b-hf")
    with pytest.raises(FileNotFoundError, match=r"'tiny/chat' at revision 'v9' is not a local directory"):
        resolve_model_dir("tiny/chat", revision="v9")


def test_an_index_entry_escaping_the_snapshot_is_still_refused(hub_cache):
    index = hub_cache / "models--tiny--chat" / "snapshots" / MAIN / "model.safetensors.index.json"
    index.unlink()
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "../../blobs/anything"}}))
    with pytest.raises(ValueError, match=r"shard path '\.\./\.\./blobs/anything' points outside"):
        load_model(resolve_model_dir("tiny/chat"), quant="nf4")


def test_not_a_directory_nor_a_repo_id(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--model '/nonexistent/model' is neither a directory, a Hugging "
                                                r"Face repo id \(owner/name\) in the local cache, nor one of "
                                                r"\['smollm2-135m-instruct'\]"):
        resolve_model_dir("/nonexistent/model")


def test_adapter_names_its_base_model(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(TINY)}))
    assert adapter_base_model(adapter) == str(TINY)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/gone/model"}))
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json: base_model_name_or_path '/gone/model' no "
                                                r"longer exists; give the base model with --model"):
        adapter_base_model(adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    with pytest.raises(ValueError, match=r"names no base_model_name_or_path; give the base model with --model"):
        adapter_base_model(adapter)

    class Args:
        model, adapter = None, None
    with pytest.raises(ValueError, match=r"give --model \(or --adapter"):
        model_source(Args())


def test_inspect_reports_an_adapters_real_rank_alpha_and_targets(tmp_path, capsys):
    from qlora_jax.inspect import main as inspect_main

    adapter = tmp_path / "adapter"
    shutil.copytree(TINY.parent / "llama3_rope_peft_adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(TINY)}))
    assert inspect_main([str(adapter)]) == 0  # the base model comes from the adapter
    out = capsys.readouterr().out
    targets = ",".join(sorted(config["target_modules"]))
    assert out.startswith(f"{TINY}: llama, 2 layers")
    assert f"adapter {adapter}: LoRA (r=4, alpha=8, targets={targets}, fp32)" in out
    assert inspect_main([str(TINY), "--lora-rank", "0"]) == 0
    assert "LoRA" not in capsys.readouterr().out


def test_generate_cli_takes_a_repo_id_from_hf_home(hub_cache, tmp_path):
    """As a user runs it: HF_HOME points at the cache, the repo id names the model, nothing is downloaded."""
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    (hf_home / "hub").symlink_to(hub_cache)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "0", "JAX_PLATFORMS": "cpu"}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-m", "qlora_jax.generate", "--model", "tiny/chat", "--prompt", "Hi",
                          "--max-new-tokens", "3", "--raw"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    missing = subprocess.run([sys.executable, "-m", "qlora_jax.generate", "--model", "tiny/absent", "--prompt", "Hi"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: --model 'tiny/absent' is not a local directory and not in the Hugging Face cache {hf_home / 'hub'} "
        "(set HF_HOME or HF_HUB_CACHE to use another); qlora_jax never downloads: fetch it once with "
        "`hf download tiny/absent`"]
