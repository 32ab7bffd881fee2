"""``python -m qlora_jax.export --model DIR [--adapter DIR --merge] --out DIR [--format bf16|bnb-nf4]``.

``--format bf16 --merge`` (default format): base + adapter as one bf16 model.
``--format bnb-nf4``: the base quantized to NF4 (+ double quant) as a transformers +
bitsandbytes 4-bit checkpoint (``quantization_config`` in config.json, bnb's tensor
names, dtypes and bytes), which transformers loads without quantizing again; load a
PEFT adapter on top of it as usual.

Merging: each adapted linear layer's frozen base weight is decoded to f32 (from its
4-bit codes when the model is loaded quantized, exactly as the fine-tune saw it), the
LoRA delta ``scaling * lora_b @ lora_a`` is added in f32 (a DoRA adapter then rescales each
row to its magnitude), and the sum is rounded once to bf16. The output is a Hugging Face
directory (``config.json`` without a ``quantization_config``, ``model.safetensors`` with
transformers' names, the tokenizer files) that transformers and qlora_jax load as an
ordinary bf16 checkpoint. It appears whole: it is written to ``<out>.partial`` and renamed.
"""

import argparse
import dataclasses
import functools
import json
import shutil
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .atomic import replace_directory
from .cli import add_model_args, apply_runtime_flags, model_source, quant_config
from .config import PROJECTIONS, QuantConfig
from .loading import load_model, read_config
from .lora import QLoRALinear
from .model import LlamaForCausalLM
from .model_source import resolve_model_dir
from .peft import load_peft_adapter, read_adapter_config
from .safetensors_io import save_streaming

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def merged_weight(module: QLoRALinear) -> np.ndarray:
    """``bf16[out, in]``: the base weight decoded to f32 plus the LoRA delta (DoRA: each row then rescaled to
    its magnitude, ``m / ||W + delta||``, as PEFT merges), rounded once to bf16."""
    weight = module.base_weight(jnp.float32)
    if module.lora is not None:
        delta = module.lora_b[...].astype(jnp.float32) @ module.lora_a[...].astype(jnp.float32)  # [out, in]
        weight = weight + module.lora.scaling * delta
        if module.lora.dora:
            weight = (module.lora_magnitude[...] / jnp.linalg.norm(weight, axis=1))[:, None] * weight
    return np.asarray(weight).astype(ml_dtypes.bfloat16)


def _tensors(model: LlamaForCausalLM) -> dict:
    """transformers name -> a function producing that bf16 tensor (so one merged weight is in memory at once)."""
    producers = {"model.embed_tokens.weight": lambda: model.embed_tokens[...],
                 "model.norm.weight": lambda: model.norm.weight[...]}
    if model.lm_head is not None:
        producers["lm_head.weight"] = lambda: model.lm_head[...]
    layer = _layer_reader(model)
    for i in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        producers[prefix + "input_layernorm.weight"] = lambda i=i: layer(i).input_layernorm.weight[...]
        producers[prefix + "post_attention_layernorm.weight"] = (
            lambda i=i: layer(i).post_attention_layernorm.weight[...])
        for name, block in PROJECTIONS.items():
            producers[f"{prefix}{block}.{name}.weight"] = (
                lambda i=i, block=block, name=name: merged_weight(getattr(getattr(layer(i), block), name)))
            if _has_bias(model, name):
                producers[f"{prefix}{block}.{name}.bias"] = (
                    lambda i=i, block=block, name=name: getattr(getattr(layer(i), block), name).bias[...])
    return producers


def _layer_reader(model: LlamaForCausalLM):
    """``model.layer`` that keeps the last layer it copied out: tensors are written layer by layer, so one copy
    serves all of a layer's tensors and one layer's copy exists at a time."""
    return functools.lru_cache(maxsize=1)(model.layer)


def _has_bias(model: LlamaForCausalLM, name: str) -> bool:
    """Whether projection ``name`` carries a bias (Qwen2's q/k/v), as ``model._projection`` builds it."""
    return model.config.attention_bias and name in ("q_proj", "k_proj", "v_proj")


def export_merged(model_dir: Path, adapter_dir: Path | None, out_dir: Path, quant: QuantConfig = QuantConfig()) -> Path:
    """Load ``model_dir`` as the fine-tune did (``quant``), add the adapter, write the merged bf16 model."""
    _, raw = read_config(model_dir)
    lora = read_adapter_config(adapter_dir) if adapter_dir else None
    model = load_model(model_dir, quant=quant, lora=lora, compute_dtype=jnp.float32)
    if adapter_dir:
        load_peft_adapter(model, adapter_dir)
    producers = _tensors(model)
    specs = [(name, _shape_of(model, name), ml_dtypes.bfloat16) for name in sorted(producers)]
    config = {k: v for k, v in raw.items() if k != "quantization_config"}
    config["torch_dtype"] = "bfloat16"
    return _write_directory(model_dir, out_dir, config, specs,
                            lambda name: np.asarray(producers[name]()).astype(ml_dtypes.bfloat16))


def _write_directory(model_dir: Path, out_dir: Path, config: dict, specs, produce) -> Path:
    """config.json + model.safetensors (streamed, one tensor at a time) + tokenizer files, appearing whole."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_streaming(specs, produce, partial / "model.safetensors", metadata={"format": "pt"})
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, partial / name)
    replace_directory(partial, out_dir)
    return out_dir


def bnb_quantization_config(quant_type: str, double_quant: bool, dtype: str) -> dict:
    """``quantization_config`` as transformers 5 writes it for ``BitsAndBytesConfig(load_in_4bit=True, ...)``."""
    return {"_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": dtype,
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": quant_type,
            "bnb_4bit_use_double_quant": double_quant, "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
            "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes"}


def export_bnb(model_dir: Path, out_dir: Path, quant_type: str = "nf4", double_quant: bool = True,
               dtype: str = "bfloat16") -> Path:
    """Quantize ``model_dir``'s linear layers as bitsandbytes does and write transformers' 4-bit checkpoint.

    ``dtype``: of the unquantized tensors, of the compute, and the dtype bnb records for the
    quantized weights (transformers records the dtype the model was loaded in).
    """
    model = load_model(model_dir, quant=QuantConfig(quant_type, double_quant=double_quant), compute_dtype=jnp.float32)
    return write_bnb(model, model_dir, out_dir, dtype)


def write_bnb(model: LlamaForCausalLM, model_dir: Path, out_dir: Path, dtype: str = "bfloat16") -> Path:
    """Write ``model``'s base as it is held (its 4-bit codes, e.g. a LoftQ base) as transformers' bitsandbytes
    4-bit checkpoint, with ``model_dir``'s config and tokenizer files."""
    if model.quant.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"a bitsandbytes checkpoint holds nf4 or fp4 weights, not {model.quant.quant_type}")
    _, raw = read_config(model_dir)
    numpy_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    arrays: dict[str, tuple] = {}  # name -> (shape, dtype, producer)
    layer = _layer_reader(model)
    for name, produce in _tensors(model).items():
        if name.endswith("_proj.weight"):
            parts = name.split(".")
            module = getattr(getattr(layer(int(parts[2])), parts[3]), parts[4])
            q = dataclasses.replace(module.quantized_weight(), dtype=dtype)
            for key, value in q.to_bnb_state_dict(name[: -len("weight")]).items():
                arrays[key] = (value.shape, value.dtype, lambda value=value: value)
        else:
            arrays[name] = (_shape_of(model, name), numpy_dtype, produce)
    quantization = bnb_quantization_config(model.quant.quant_type, model.quant.double_quant, dtype)
    config = {**raw, "dtype": dtype, "quantization_config": quantization}
    config.pop("torch_dtype", None)
    specs = [(name, shape, array_dtype) for name, (shape, array_dtype, _) in sorted(arrays.items())]
    return _write_directory(model_dir, out_dir, config, specs,
                            lambda name: np.asarray(arrays[name][2]()).astype(arrays[name][1]))


def _shape_of(model: LlamaForCausalLM, name: str) -> tuple[int, ...]:
    parts = name.split(".")
    if parts[-2].endswith("_proj"):
        out_features, in_features = model.config.linear_shapes()[parts[4]]
        return (out_features,) if parts[-1] == "bias" else (out_features, in_features)
    if name == "lm_head.weight":
        return tuple(model.lm_head[...].shape)
    if name == "model.embed_tokens.weight":
        return tuple(model.embed_tokens[...].shape)
    return (model.config.hidden_size,)  # the norms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_jax.export", description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--merge", action="store_true", help="write base + adapter as one bf16 model")
    parser.add_argument("--format", default="bf16", choices=["bf16", "bnb-nf4"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="bnb-nf4: dtype of the unquantized tensors and of the compute")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        apply_runtime_flags(args)
        model_dir = resolve_model_dir(model_source(args), args.revision)
        if args.format == "bnb-nf4":
            if args.adapter or args.merge:
                raise ValueError("--format bnb-nf4 writes the 4-bit base alone; load the adapter on top with PEFT")
            out = export_bnb(model_dir, args.out, "nf4", args.double_quant, args.dtype)
        elif not args.merge:
            raise ValueError("--format bf16 needs --merge: it writes base + adapter as one bf16 model")
        else:  # --quant etc.: how the base was held while training (the merge adds the delta to that base)
            out = export_merged(model_dir, args.adapter, args.out, quant_config(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
