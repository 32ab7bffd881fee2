"""The stacked decoder layers in a loop, with a backward pass that recomputes each layer and can
add the adapters' gradients into an existing accumulator in place.

``checkpointed_layers(apply, x, trained, frozen, per_layer, shared, accumulator)`` runs
``x = apply(x, trained[i], frozen[i], per_layer[i], shared)`` for ``i = 0 .. L-1`` (every leaf of
``trained``/``frozen``/``per_layer`` stacked ``[L, ...]``) and keeps only each layer's input for
the backward pass, which recomputes one layer at a time from its input (``jax.vjp``): the
``layer`` checkpointing policy, as ``jax.checkpoint`` around a ``lax.scan`` body gives it.

Why its own backward pass: gradient accumulation. Autodiff returns each micro-batch's adapter
gradients in a new buffer, which the step then adds to its running sum, so two gradient-sized
buffers exist at once (at LLaMA-65B, r=64: 3 GiB each). Given ``accumulator`` (the running sum,
stacked like ``trained``), the backward pass instead adds each layer's gradient into the
accumulator's slot for that layer, and the gradient returned for ``trained`` *is* the updated
sum, in the accumulator's buffer, as PyTorch accumulates into ``.grad``; without one the sum
starts from zeros. Gradients flow to ``x`` and ``trained`` only (``frozen``, ``per_layer``,
``shared`` and ``accumulator`` get none).
"""

import functools

import jax
import jax.numpy as jnp


def _slot(tree, index):
    return jax.tree.map(lambda leaf: jax.lax.dynamic_index_in_dim(leaf, index, keepdims=False), tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def checkpointed_layers(apply, x, trained, frozen, per_layer, shared, accumulator=None):
    """``apply(x, trained_i, frozen_i, per_layer_i, shared) -> x`` over the stacked layers; the last ``x``."""
    return _forward(apply, x, trained, frozen, per_layer, shared, accumulator)[0]


def _as_bits(x: jax.Array) -> jax.Array:
    """``x`` as unsigned integers of its width, the form in which the layer inputs are kept.

    The backward pass reads each kept input only through the layer's f32 norm. Kept as floats,
    XLA's CPU backend then stores the whole ``[L, B, T, D]`` stack already converted to f32
    (twice the bytes: 0.12 GiB more at LLaMA-7B, seq 512, bf16; ``python -m qlora_jax.memory
    --compiled``); the integer view leaves it nothing to convert.
    """
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))


def _forward(apply, x, trained, frozen, per_layer, shared, accumulator):
    def body(x, layer):
        return apply(x, *layer, shared), _as_bits(x)  # the layer's input is all the backward pass keeps

    x_out, inputs = jax.lax.scan(body, x, (trained, frozen, per_layer))
    return x_out, (inputs, trained, frozen, per_layer, shared, accumulator)  # inputs: [L, *x.shape] as bits


def _backward(apply, residuals, grad_out):
    inputs, trained, frozen, per_layer, shared, accumulator = residuals
    layers = inputs.shape[0]

    def layer_vjp(index, grad_x):  # (d input, d trained) of layer ``index``, recomputed from its input
        frozen_i, per_layer_i = _slot(frozen, index), _slot(per_layer, index)
        x_i = jax.lax.bitcast_convert_type(inputs[index], grad_x.dtype)
        _, pullback = jax.vjp(lambda x, t: apply(x, t, frozen_i, per_layer_i, shared), x_i,
                              _slot(trained, index))
        return pullback(grad_x)

    def step(carry, index):
        grad_x, grads = carry
        grad_x, grad_layer = layer_vjp(index, grad_x)
        grads = jax.tree.map(lambda buf, g: jax.lax.dynamic_update_index_in_dim(  # in place: buf is not used after
            buf, jax.lax.dynamic_index_in_dim(buf, index, keepdims=False) + g, index, 0), grads, grad_layer)
        return (grad_x, grads), None

    start = jax.tree.map(jnp.zeros_like, trained) if accumulator is None else accumulator
    (grad_x, grads), _ = jax.lax.scan(step, (grad_out, start), jnp.arange(layers - 1, -1, -1))
    return grad_x, grads, None, None, None, None


checkpointed_layers.defvjp(_forward, _backward)
