"""Load a Hugging Face model directory into the NNX model, quantizing while streaming.

The model is first built abstractly (``nnx.eval_shape``: shapes only, no memory),
then each checkpoint tensor is read from a memory-mapped safetensors file, moved
to the device, quantized there and dropped, so host and device memory stay about
one tensor above the quantized model. With a device mesh, each decoder layer goes to its
shards (``qlora_jax.parallel``) as soon as it is quantized. A bitsandbytes 4-bit checkpoint
(``quantization_config.quant_method == "bitsandbytes"``) is taken bit for bit.
"""

import resource
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import parallel
from .checkpoint_files import CheckpointReader
from .config import PROJECTIONS, LoraConfig, ModelConfig, QuantConfig
from .jsonio import read_json_object
from .lora import LoRAParam, QLoRALinear, init_lora
from .model import LlamaForCausalLM
from .model_source import compute_dtype as resolve_compute_dtype
from .model_source import resolve_model_dir
from .peft import load_peft_adapter, read_adapter_config
from .quant import QuantizedTensor
from .tokenizer import load_tokenizer


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux ``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_config(directory: Path) -> tuple[ModelConfig, dict]:
    """The model config and the raw ``config.json`` dict of a model directory."""
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    path = directory / "config.json"
    if not path.is_file():
        found = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(f"{directory} has no config.json (found: {found})")
    raw = read_json_object(path)
    return ModelConfig.from_hf_dict(raw, source=str(path)), raw


def bnb_quant_config(raw: dict, source: str) -> QuantConfig | None:
    """The ``QuantConfig`` of a bitsandbytes 4-bit checkpoint, or None for an unquantized one."""
    qc = raw.get("quantization_config")
    if not qc:
        return None
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        raise ValueError(f"{source}: quantization_config {qc.get('quant_method')!r} is not supported; "
                         "only bitsandbytes 4-bit (load_in_4bit) checkpoints, or unquantized ones")
    if qc.get("bnb_4bit_quant_storage", "uint8") != "uint8":
        raise ValueError(f"{source}: bnb_4bit_quant_storage={qc['bnb_4bit_quant_storage']!r} is not supported (uint8)")
    return QuantConfig(quant_type=qc.get("bnb_4bit_quant_type", "fp4"), blocksize=64,
                       double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)))


def _expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, v = config.hidden_size, config.vocab_size
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    linear = config.linear_shapes()
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        shapes[prefix + "input_layernorm.weight"] = (d,)
        shapes[prefix + "post_attention_layernorm.weight"] = (d,)
        for name, block in PROJECTIONS.items():
            shapes[f"{prefix}{block}.{name}.weight"] = linear[name]
            if config.attention_bias and name in ("q_proj", "k_proj", "v_proj"):
                shapes[f"{prefix}{block}.{name}.bias"] = (linear[name][0],)
    return shapes


def _check_checkpoint(reader: CheckpointReader, config: ModelConfig, prequantized: bool, directory: Path) -> None:
    expected = _expected_tensors(config)
    missing = [name for name in expected if name not in reader]
    if missing:
        raise ValueError(f"{directory}: checkpoint lacks {len(missing)} tensor(s) config.json implies, "
                         f"e.g. {missing[:3]}")
    for name, shape in expected.items():
        is_packed_linear = prequantized and name.endswith("_proj.weight")
        if not is_packed_linear and reader.shape(name) != shape:
            raise ValueError(f"{directory}: {name} has shape {reader.shape(name)} but config.json implies {shape}")


def _bnb_layer_state(reader: CheckpointReader, prefix: str) -> dict[str, np.ndarray]:
    return {name: reader.get(name) for name in reader.names() if name.startswith(prefix + "weight")}


def _load_linear(layer: QLoRALinear, reader: CheckpointReader, prefix: str, prequantized: bool) -> None:
    if prequantized:
        layer.load_quantized(QuantizedTensor.from_bnb_state_dict(_bnb_layer_state(reader, prefix), prefix))
    else:
        layer.load_weight(jnp.asarray(reader.get(prefix + "weight")))
    if layer.bias is not None:
        layer.bias.set_value(jnp.asarray(reader.get(prefix + "bias"), jnp.bfloat16))


def _place_frozen(module: nnx.Module, mesh) -> None:
    """Move ``module``'s frozen arrays to their shards on ``mesh`` (nothing without a mesh)."""
    if mesh is not None:
        _, _, frozen = nnx.split(module, LoRAParam, ...)
        nnx.update(module, parallel.shard_frozen(frozen, mesh))


def load_model(path: str | Path, quant: QuantConfig | str = QuantConfig(), lora: LoraConfig | None = None,
               compute_dtype=jnp.bfloat16, seed: int = 0, verbose: bool = False, mesh=None,
               remat: str = "none") -> LlamaForCausalLM:
    """Load a local Hugging Face LLaMA-family directory as a QLoRA model.

    ``quant``: how the base is held (a ``QuantConfig``; a type name such as ``"none"``
    means that type with the default blocksize and double quantization). A bitsandbytes
    4-bit checkpoint is loaded as stored; its storage must match ``quant``. ``lora``:
    adapters on the configured targets (None: no adapters). ``verbose`` prints the peak
    resident memory after loading. ``mesh``: a ``jax.sharding.Mesh`` to shard the frozen
    weights over (``parallel.frozen_spec``); the LoRA parameters stay where they are created.
    """
    directory = Path(path)
    config, raw = read_config(directory)
    quant_config = QuantConfig(quant_type=quant) if isinstance(quant, str) else quant
    stored = bnb_quant_config(raw, str(directory / "config.json"))
    if stored is not None and stored.storage != quant_config.storage:
        raise ValueError(f"{directory} is a bitsandbytes checkpoint quantized as {stored.quant_type}, blocksize "
                         f"{stored.blocksize}, double_quant={stored.double_quant}; load it with those settings "
                         f"(asked for {', '.join(map(str, quant_config.storage))})")
    if stored is not None and lora is not None and lora.init == "loftq":
        raise ValueError(f"{directory} is a bitsandbytes 4-bit checkpoint; lora.init: loftq fits the error of "
                         "quantizing the original weights, so point model.path at the unquantized model")
    with CheckpointReader(directory) as reader:
        _check_checkpoint(reader, config, stored is not None, directory)
        model = nnx.eval_shape(lambda: LlamaForCausalLM(config, quant=quant_config, lora=lora,
                                                        compute_dtype=compute_dtype, remat=remat,
                                                        rngs=nnx.Rngs(seed)))
        model.embed_tokens.set_value(jnp.asarray(reader.get("model.embed_tokens.weight"), jnp.bfloat16))
        model.norm.weight.set_value(jnp.asarray(reader.get("model.norm.weight"), jnp.bfloat16))
        if model.lm_head is not None:
            model.lm_head.set_value(jnp.asarray(reader.get("lm_head.weight"), jnp.bfloat16))
        for i in range(config.num_hidden_layers):  # one layer at a time, each written into its slot
            layer, prefix = model.layer(i), f"model.layers.{i}."
            layer.input_layernorm.weight.set_value(jnp.asarray(reader.get(prefix + "input_layernorm.weight"),
                                                             jnp.bfloat16))
            layer.post_attention_layernorm.weight.set_value(jnp.asarray(
                reader.get(prefix + "post_attention_layernorm.weight"), jnp.bfloat16))
            for name, block in PROJECTIONS.items():
                module = getattr(getattr(layer, block), name)
                _load_linear(module, reader, f"{prefix}{block}.{name}.", stored is not None)
            _place_frozen(layer, mesh)
            model.set_layer(i, layer)
        if mesh is not None:
            for name, variable in (("embed_tokens", model.embed_tokens), ("norm", model.norm.weight),
                                   ("lm_head", model.lm_head)):
                if variable is not None:
                    variable.set_value(parallel.place_frozen(name, variable.get_value(), mesh))
    if lora is not None:
        init_lora(model.layers, seed)
    if verbose:
        print(f"loaded {directory} ({quant_config.quant_type}): peak RSS {peak_rss_mib():.0f} MiB")
    return model


def random_model(config: ModelConfig, quant: QuantConfig = QuantConfig(), lora: LoraConfig | None = None,
                 compute_dtype=jnp.bfloat16, seed: int = 0, init_scale: float = 0.02,
                 remat: str = "none") -> LlamaForCausalLM:
    """A model with random N(0, init_scale) weights (for tests and benchmarks), quantized as configured."""
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, quant=quant, lora=lora, compute_dtype=compute_dtype,
                                                    remat=remat, rngs=nnx.Rngs(seed)))
    key = jax.random.key(seed + 1)
    counter = iter(range(1 << 30))

    def normal(shape):
        return (init_scale * jax.random.normal(jax.random.fold_in(key, next(counter)), shape)).astype(jnp.bfloat16)

    model.embed_tokens.set_value(normal(model.embed_tokens.get_value().shape))
    if model.lm_head is not None:
        model.lm_head.set_value(normal(model.lm_head.get_value().shape))
    model.norm.weight.set_value(jnp.ones(model.norm.weight.get_value().shape, jnp.bfloat16))
    for i in range(config.num_hidden_layers):
        layer = model.layer(i)
        layer.input_layernorm.weight.set_value(jnp.ones((config.hidden_size,), jnp.bfloat16))
        layer.post_attention_layernorm.weight.set_value(jnp.ones((config.hidden_size,), jnp.bfloat16))
        for name, block in PROJECTIONS.items():
            module = getattr(getattr(layer, block), name)
            module.load_weight(normal((module.out_features, module.in_features)))
            if module.bias is not None:
                module.bias.set_value(normal((module.out_features,)))
        model.set_layer(i, layer)
    if lora is not None:
        init_lora(model.layers, seed)
    return model


def load_for_inference(source: str | Path, adapter_dir: str | Path | None = None, quant: QuantConfig = QuantConfig(),
                       revision: str | None = None, compute_dtype: str = "auto"):
    """The model (``quant`` base + optional PEFT adapter) and its tokenizer.

    ``source``: a built-in name, a directory or a cached Hugging Face repo id
    (``model_source.resolve_model_dir``); ``compute_dtype`` as ``ModelSource.compute_dtype``.
    """
    model_dir = resolve_model_dir(source, revision)
    adapter_dir = Path(adapter_dir) if adapter_dir else None
    lora = read_adapter_config(adapter_dir) if adapter_dir else None
    dtype = resolve_compute_dtype(compute_dtype, training=False, quantized=quant.quantized)
    model = load_model(model_dir, quant=quant, lora=lora, compute_dtype=dtype)
    if adapter_dir:
        load_peft_adapter(model, adapter_dir)
    return model, load_tokenizer(model_dir)
