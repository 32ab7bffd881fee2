"""The flags every command shares to name a base model, its adapter and its quantization, and what they build."""

import argparse
from pathlib import Path

from .compile_cache import enable_compilation_cache
from .config import QuantConfig
from .model_source import BUILTIN_MODELS, adapter_base_model


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--revision``, ``--adapter``, ``--quant``, ``--blocksize``, ``--[no-]double-quant``,
    ``--compute-dtype``: the same names, defaults and help in every command."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", help=f"base model: a Hugging Face directory, a repo id in the local Hugging Face "
                                       f"cache (owner/name), or {', '.join(BUILTIN_MODELS)}; default: the "
                                       "adapter's base_model_name_or_path")
    group.add_argument("--revision", help="branch, tag or commit of a cached repo id (default: main)")
    group.add_argument("--adapter", type=Path, help="PEFT LoRA adapter directory")
    add_quant_args(group)
    group.add_argument("--compute-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                       help="activation dtype; auto: float32 on CPU (faster decoding there), bfloat16 on GPU/TPU")
    group.add_argument("--compilation-cache", action=argparse.BooleanOptionalAction, default=True,
                       help="keep compiled programs in $QLORA_JAX_CACHE/jax_compilation_cache for the next run")


def add_quant_args(group) -> None:
    """``--quant``, ``--blocksize``, ``--[no-]double-quant``, ``--kernel``: how the frozen base is held and
    multiplied (``quant_config``)."""
    group.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "int4", "none"],
                       help="how the frozen base is held (none: bf16)")
    group.add_argument("--blocksize", type=int, default=64, help="elements per absmax block")
    group.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                       help="8-bit absmax constants, as training uses by default")
    group.add_argument("--kernel", default="auto", choices=["auto", "pallas", "xla"],
                       help="4-bit matmul (quant.kernel): pallas (fused kernels, GPU), xla (dequantize + dot), auto "
                            "(on a GPU pallas for few rows, as in decoding, else xla; xla elsewhere)")


def apply_runtime_flags(args: argparse.Namespace) -> None:
    """Turn on the persistent compilation cache unless ``--no-compilation-cache``."""
    if args.compilation_cache:
        enable_compilation_cache()


def quant_config(args: argparse.Namespace) -> QuantConfig:
    """The ``QuantConfig`` the flags describe (``ValueError`` naming the bad one)."""
    return QuantConfig(quant_type=args.quant, blocksize=args.blocksize, double_quant=args.double_quant,
                       kernel=args.kernel)


def model_source(args: argparse.Namespace) -> str:
    """``--model``, or the base model the ``--adapter`` names, as PEFT's ``AutoPeftModelForCausalLM`` reads it."""
    if args.model:
        return args.model
    if args.adapter:
        return adapter_base_model(args.adapter)
    raise ValueError("give --model (or --adapter, whose adapter_config.json names its base model)")
