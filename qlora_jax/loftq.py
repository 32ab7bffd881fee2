"""LoftQ initialization (Li et al., 2023): adapters that start as the low-rank part of the quantization error.

Pure functions on one weight. ``loftq(W, ...)`` returns the quantized base ``Q`` and adapters
``lora_a: f32[R, in]``, ``lora_b: f32[out, R]`` with ``dequant(Q) + scaling * lora_b @ lora_a``
close to ``W: [out, in]``: the best rank-R fit of ``W - dequant(Q)`` (truncated SVD, split as
PEFT splits it, ``U sqrt(S)`` and ``sqrt(S) Vh``). With ``iters`` > 1 the base is re-quantized from
``W - scaling * lora_b @ lora_a`` and the adapters re-fitted, ``iters`` times in all (PEFT's ``loftq_init``).

One difference from PEFT, on purpose: PEFT leaves out LoRA's ``scaling`` (alpha / r) when it
sets A and B (huggingface/peft#1982), so its start equals ``dequant(Q) + B @ A`` only when
alpha = r. Here both factors are divided by ``sqrt(scaling)``, so the adapted layer starts at
``dequant(Q) + residual fit`` for every alpha; with alpha = r the two are the same.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from .config import QuantConfig
from .quant import QuantizedTensor, dequantize, quantize


@functools.partial(jax.jit, static_argnums=(1, 2))
def low_rank_fit(residual: jax.Array, rank: int, scaling: float) -> tuple[jax.Array, jax.Array]:
    """``residual: f32[out, in]`` -> (``a: f32[R, in]``, ``b: f32[out, R]``) with ``scaling * b @ a`` its best
    rank-R approximation (R = min(rank, out, in); fewer columns than ``rank`` are padded with zeros)."""
    u, s, vh = jnp.linalg.svd(residual, full_matrices=False)
    kept = min(rank, s.shape[0])
    root = jnp.sqrt(s[:kept]) / jnp.sqrt(jnp.float32(scaling))
    a = root[:, None] * vh[:kept]
    b = u[:, :kept] * root[None, :]
    if kept < rank:
        a = jnp.pad(a, ((0, rank - kept), (0, 0)))
        b = jnp.pad(b, ((0, 0), (0, rank - kept)))
    return a, b


def loftq(weight: jax.Array, quant: QuantConfig, rank: int, scaling: float,
          iters: int = 1) -> tuple[QuantizedTensor, jax.Array, jax.Array]:
    """The quantized base and adapters ``(Q, lora_a f32[R, in], lora_b f32[out, R])`` for ``weight: [out, in]``.

    ``iters`` = 1: ``Q`` is the standard quantization of ``weight`` (bit-identical to ``quantize``).
    """
    if not quant.quantized:
        raise ValueError("LoftQ fits the quantization error; quant_type 'none' has none")
    original = jnp.asarray(weight, jnp.float32)
    target = jnp.asarray(weight)
    for step in range(iters):
        q = quantize(target, quant.quant_type, quant.blocksize, quant.double_quant)
        a, b = low_rank_fit(original - dequantize(q, jnp.float32), rank, scaling)
        if step + 1 < iters:
            target = original - scaling * (b @ a)
    return dataclasses.replace(q, dtype=jnp.dtype(weight.dtype).name), a, b
