"""qlora_jax: QLoRA fine-tuning of LLaMA-family models in JAX."""

from .loading import load_model
from .tokenizer import load_tokenizer

__version__ = "0.1.0"
__all__ = ["load_model", "load_tokenizer"]
