"""``y = x @ dequant(W).T`` for a frozen 4-bit weight, with a gradient for ``x`` only.

The weight never gets a gradient, and the dequantized weight is not kept as a
residual for the backward pass: the backward pass dequantizes again and computes
``dx = dy @ dequant(W)``. This is the XLA path (dequantize, then dot); the Pallas
GPU kernels plug in behind the same function.
"""

import functools

import jax
import jax.numpy as jnp

from .quant import QuantizedTensor, dequantize


def quantized_matmul(x: jax.Array, weight: QuantizedTensor, compute_dtype) -> jax.Array:
    """``x: [..., in]`` times a ``[out, in]`` quantized weight -> ``[..., out]`` in ``compute_dtype``."""
    return _matmul_for(jnp.dtype(compute_dtype).name)(x, weight)


@functools.cache
def _matmul_for(dtype_name: str):
    compute_dtype = jnp.dtype(dtype_name)

    def forward(x, weight):
        w = dequantize(weight, compute_dtype)  # [out, in]
        y = jnp.einsum("...i,oi->...o", x.astype(compute_dtype), w, preferred_element_type=jnp.float32)
        return y.astype(compute_dtype)

    def forward_with_residuals(x, weight):
        return forward(x, weight), (weight, x[..., :0])  # x[..., :0] carries x's dtype, no data

    def backward(residuals, dy):
        weight, x_like = residuals
        w = dequantize(weight, compute_dtype)  # recomputed: no dequantized copy is kept between passes
        dx = jnp.einsum("...o,oi->...i", dy.astype(compute_dtype), w, preferred_element_type=jnp.float32)
        return dx.astype(x_like.dtype), None

    matmul = jax.custom_vjp(forward)
    matmul.defvjp(forward_with_residuals, backward)
    return matmul
