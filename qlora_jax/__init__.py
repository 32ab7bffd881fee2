"""qlora_jax: QLoRA fine-tuning of LLaMA-family models in JAX.

``load_model`` and ``load_tokenizer`` are imported on first use, so that
``qlora_jax.quant`` can be imported on its own (``pallas_kernels`` builds on it and the
model's layers build on ``pallas_kernels``).
"""

import importlib

__version__ = "0.2.0"
__all__ = ["load_model", "load_tokenizer"]
_LAZY = {"load_model": ".loading", "load_tokenizer": ".tokenizer"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
