"""LoRA adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's for a causal LM: ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``
(``f32[R, in]``) and ``...lora_B.weight`` (``f32[out, R]``) — the layout our ``QLoRALinear`` keeps —
and, for DoRA (``use_dora``), ``...q_proj.lora_magnitude_vector`` (``f32[out]``, no ``.weight``).
"""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from .atomic import replace_directory
from .config import PROJECTIONS, LoraConfig
from .jsonio import read_json_object
from .lora import QLoRALinear
from .model import LlamaForCausalLM
from .safetensors_io import load_file, save_file


def _adapted_projections(model: LlamaForCausalLM):
    """``(PEFT prefixes of layers 0..L-1, stacked projection)`` for each adapted projection: its ``lora_a`` and
    ``lora_b`` hold every layer's adapter along their first axis."""
    for name, block in PROJECTIONS.items():
        module: QLoRALinear = getattr(getattr(model.layers, block), name)
        if module.lora is not None:
            prefixes = [f"base_model.model.model.layers.{i}.{block}.{name}"
                        for i in range(model.config.num_hidden_layers)]
            yield prefixes, module


def _adapter_arrays(module: QLoRALinear):
    """``(PEFT's name after the projection's prefix, stacked variable)`` of each array of one adapter."""
    yield "lora_A.weight", module.lora_a
    yield "lora_B.weight", module.lora_b
    if module.lora.dora:
        yield "lora_magnitude_vector", module.lora_magnitude


def adapter_config(lora: LoraConfig, base_model: str) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": lora.rank,
        "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": sorted(lora.targets),
        "bias": "none", "use_rslora": lora.rslora, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "revision": None,
        "use_dora": lora.dora,
    }


def save_peft_adapter(model: LlamaForCausalLM, out_dir: Path, base_model: str) -> Path:
    """Write the model's adapters as a PEFT adapter directory.

    The directory appears whole: files are written into ``<out_dir>.partial`` and it is
    renamed into place, so a crash leaves either the previous adapter or the new one.
    """
    if model.lora is None:
        raise ValueError("the model has no LoRA adapters to save")
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tensors = {}
    for prefixes, module in _adapted_projections(model):
        for name, stacked in _adapter_arrays(module):
            values = np.asarray(stacked[...], np.float32)  # [L, ...]
            tensors.update({f"{prefix}.{name}": values[i] for i, prefix in enumerate(prefixes)})
    save_file(tensors, partial / "adapter_model.safetensors", metadata={"format": "pt"})
    (partial / "adapter_config.json").write_text(json.dumps(adapter_config(model.lora, base_model), indent=2))
    replace_directory(partial, out_dir)
    return out_dir


def read_adapter_config(adapter_dir: str | Path) -> LoraConfig:
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json")
    raw = read_json_object(path)
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type={raw.get('peft_type')!r}; only LORA adapters are supported")
    targets = raw.get("target_modules") or []
    try:
        return LoraConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]),
                          dropout=float(raw.get("lora_dropout", 0)), targets=tuple(sorted(targets)),
                          rslora=bool(raw.get("use_rslora", False)), dora=bool(raw.get("use_dora", False)))
    except KeyError as err:
        raise ValueError(f"{path}: missing key {err.args[0]!r} (a PEFT LoRA adapter config has r and lora_alpha)") \
            from None
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid LoRA settings ({err})") from None


def _identity(lora: LoraConfig) -> tuple:
    """What must agree between an adapter and the model it is loaded into."""
    return lora.rank, lora.alpha, lora.rslora, lora.dora, tuple(sorted(lora.targets))


def load_peft_adapter(model: LlamaForCausalLM, adapter_dir: str | Path) -> None:
    """Copy a PEFT adapter (ours or one trained with PyTorch PEFT) into ``model``'s adapters."""
    adapter_dir = Path(adapter_dir)
    lora = read_adapter_config(adapter_dir)
    if model.lora is None or _identity(lora) != _identity(model.lora):
        raise ValueError(f"{adapter_dir}: adapter has rank {lora.rank}, alpha {lora.alpha:g}, rslora {lora.rslora}, "
                         f"dora {lora.dora} on {list(lora.targets)}; the model expects {model.lora}")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_model.safetensors")
    tensors = load_file(weights)
    for prefixes, module in _adapted_projections(model):
        for name, stacked in _adapter_arrays(module):
            layer_shape = stacked.get_value().shape[1:]
            values = [_adapter_tensor(tensors, f"{prefix}.{name}", layer_shape, adapter_dir, weights)
                      for prefix in prefixes]
            stacked.set_value(jnp.asarray(np.stack(values), stacked.get_value().dtype))


def _adapter_tensor(tensors: dict, key: str, shape: tuple, adapter_dir: Path, weights: Path) -> np.ndarray:
    """One layer's adapter array ``key`` (PEFT's name, with or without ``.default``), checked: ``f32[shape]``."""
    with_default = key[: -len(".weight")] + ".default.weight" if key.endswith(".weight") else key + ".default"
    name = next((k for k in (key, with_default) if k in tensors), None)
    if name is None:
        raise ValueError(f"{adapter_dir}: adapter lacks {key} (different base model?)")
    if tensors[name].shape != shape:
        raise ValueError(f"{adapter_dir}: {name} has shape {tensors[name].shape}, the model expects "
                         f"{shape} (different base model or rank?)")
    values = np.asarray(tensors[name], np.float32)
    if not np.isfinite(values).all():
        raise ValueError(f"{weights}: tensor {name!r} holds {np.count_nonzero(~np.isfinite(values))} NaN/Inf "
                         "values (the adapter was saved from a diverged run?)")
    return values
