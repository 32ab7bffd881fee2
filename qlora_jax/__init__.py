"""qlora_jax: QLoRA fine-tuning of LLaMA-family models in JAX.

The Python API (README, "Python API"): ``load_run_config`` (+ ``qlora_jax.train.train``);
``load_for_inference`` (or ``load_model`` + ``load_tokenizer``; + ``qlora_jax.generate.generate``);
``perplexity`` and ``mmlu``. ``train`` and ``generate`` stay in their modules, whose names they
share. These are imported on first use, so that ``qlora_jax.quant`` can be imported on its own
(``pallas_kernels`` builds on it and the model's layers build on ``pallas_kernels``).
"""

import importlib

__version__ = "0.2.0"
_LAZY = {"load_model": ".loading", "load_for_inference": ".loading", "load_tokenizer": ".tokenizer",
         "load_run_config": ".config_io", "perplexity": ".evaluate", "mmlu": ".evaluate"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
