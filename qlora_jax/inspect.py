"""``python -m qlora_jax.inspect (MODEL_DIR | ADAPTER_DIR | --model SOURCE)``: parameters and bytes as held.

Architecture, parameter counts and bytes as qlora_jax holds the model, with an adapter's real
rank, alpha and targets when an adapter directory is given.

Shapes are computed abstractly (``nnx.eval_shape``), so no weights are read or allocated.
"""

import argparse
import functools
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from .cli import add_model_args, model_source, quant_config
from .config import LoraConfig, ModelConfig, QuantConfig
from .loading import bnb_quant_config, read_config
from .lora import Frozen, LoRAParam, QuantState
from .model import LlamaForCausalLM
from .model_source import resolve_model_dir
from .peft import read_adapter_config


def _size(leaf) -> tuple[int, int]:
    count = int(np.prod(leaf.shape))
    return count, count * leaf.dtype.itemsize


def memory_report(config: ModelConfig, quant: QuantConfig, lora: LoraConfig | None) -> dict[str, int]:
    """Element counts and bytes of each part of the model as held (abstract: nothing is allocated)."""
    return dict(_memory_report(config, quant, lora))


@functools.cache  # tracing a 65B model's modules takes ~20 s; the configs are frozen, hence hashable
def _memory_report(config: ModelConfig, quant: QuantConfig, lora: LoraConfig | None) -> dict[str, int]:
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, quant=quant, lora=lora, rngs=nnx.Rngs(0)))
    report = {"linear_params": config.num_hidden_layers * sum(o * i for o, i in config.linear_shapes().values()),
              "codes_bytes": 0, "constants_bytes": 0, "frozen_params": 0, "frozen_bytes": 0,
              "lora_params": 0, "lora_bytes": 0}
    for path, variable in nnx.to_flat_state(nnx.state(model, QuantState)):
        _, nbytes = _size(variable.get_value())
        report["codes_bytes" if path[-1] == "packed" else "constants_bytes"] += nbytes
    for kind, variable_type in (("frozen", Frozen), ("lora", LoRAParam)):
        for leaf in jax.tree.leaves(nnx.state(model, variable_type)):
            count, nbytes = _size(leaf)
            report[f"{kind}_params"] += count
            report[f"{kind}_bytes"] += nbytes
    return report


def describe(directory: Path, quant: QuantConfig, lora: LoraConfig | None, adapter: Path | None = None) -> str:
    config, raw = read_config(directory)
    stored = bnb_quant_config(raw, str(directory / "config.json"))
    quant = stored or quant
    r = memory_report(config, quant, lora)
    base_linear_bytes = r["codes_bytes"] + r["constants_bytes"] if quant.quantized else None
    mib = 1024 ** 2
    lines = [
        f"{directory}: {config.model_type}, {config.num_hidden_layers} layers, D={config.hidden_size}, "
        f"F={config.intermediate_size}, H={config.num_attention_heads}, G={config.num_key_value_heads}, "
        f"K={config.head_dim}, V={config.vocab_size}, tied={config.tie_word_embeddings}, rope={config.rope.kind}",
        f"parameters: {r['linear_params'] + r['frozen_params']:,} (linear {r['linear_params']:,}, "
        f"embeddings/norms/lm_head {r['frozen_params'] - (0 if quant.quantized else r['linear_params']):,})",
    ]
    if base_linear_bytes is not None:
        lines.append(f"linear layers ({quant.quant_type}, blocksize {quant.blocksize}, double_quant="
                     f"{quant.double_quant}{', as stored' if stored else ''}): codes {r['codes_bytes'] / mib:.1f} MiB "
                     f"+ constants {r['constants_bytes'] / mib:.2f} MiB = "
                     f"{8 * base_linear_bytes / r['linear_params']:.3f} bits/param")
    lines.append(f"unquantized frozen (bf16): {r['frozen_bytes'] / mib:.1f} MiB")
    if lora is not None:
        where = f"adapter {adapter}: " if adapter else ""
        kind = "DoRA" if lora.dora else "LoRA"
        lines.append(f"{where}{kind} (r={lora.rank}, alpha={lora.alpha:g}, targets={','.join(lora.targets)}, fp32): "
                     f"{r['lora_params']:,} params, {r['lora_bytes'] / mib:.1f} MiB")
    total = r["codes_bytes"] + r["constants_bytes"] + r["frozen_bytes"] + r["lora_bytes"]
    lines.append(f"total held: {total / mib:.1f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_jax.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", type=Path,
                        help="a model directory, or a PEFT adapter directory (its base model is described with "
                             "the adapter's real rank, alpha and targets)")
    add_model_args(parser)
    parser.add_argument("--lora-rank", type=int, default=64,
                        help="rank of hypothetical adapters on all projections when no adapter is given; 0: none")
    args = parser.parse_args(argv)
    try:
        if args.directory is not None and (args.directory / "adapter_config.json").is_file():
            args.adapter = args.adapter or args.directory
        elif args.directory is not None:
            args.model = args.model or str(args.directory)
        if args.adapter:
            lora = read_adapter_config(args.adapter)
        else:
            lora = LoraConfig(rank=args.lora_rank) if args.lora_rank else None
        model_dir = resolve_model_dir(model_source(args), args.revision)
        print(describe(model_dir, quant_config(args), lora, args.adapter))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
