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
    """Layer ``index`` of each ``[L, ...]`` leaf.

    XLA's CPU backend has no bf16 ``dynamic-slice``: it converts the whole ``[L, ...]`` operand to
    f32, slices that, and hoists the conversion out of the loop, so an f32 copy of every layer's
    bf16 adapters stayed alive through the step (0.6 GiB at LLaMA-7B, r=64, ``lora.dtype:
    bfloat16``; a bitcast to integers is a copy there too). Lowered for the CPU, 16-bit leaves
    are therefore sliced by a ``switch`` over the layers' static slices; elsewhere, and for other
    leaves, by ``dynamic-slice``.
    """
    def dynamic(arrays, index):
        return [jax.lax.dynamic_index_in_dim(leaf, index, keepdims=False) for leaf in arrays]

    def static(arrays, index):
        layers = arrays[0].shape[0]
        return jax.lax.switch(index, [lambda arrays, i=i: [leaf[i] for leaf in arrays] for i in range(layers)], arrays)

    leaves, treedef = jax.tree.flatten(tree)
    narrow = [leaf for leaf in leaves if _is_16_bit_float(leaf)]
    picked = iter(jax.lax.platform_dependent(narrow, index, cpu=static, default=dynamic) if narrow else [])
    return jax.tree.unflatten(treedef, [next(picked) if _is_16_bit_float(leaf) else dynamic([leaf], index)[0]
                                        for leaf in leaves])


def _is_16_bit_float(leaf) -> bool:
    return jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype.itemsize == 2


def _add_to_slot(bits, index, value):
    """``bits[index] += value`` in place, for ``bits`` a ``[L, ...]`` array of ``value.dtype`` as bits."""
    old = _from_bits(jax.lax.dynamic_index_in_dim(bits, index, keepdims=False), value.dtype)
    return jax.lax.dynamic_update_index_in_dim(bits, _as_bits(old + value), index, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def checkpointed_layers(apply, x, trained, frozen, per_layer, shared, accumulator=None):
    """``apply(x, trained_i, frozen_i, per_layer_i, shared) -> x`` over the stacked layers; the last ``x``."""
    return _forward(apply, x, trained, frozen, per_layer, shared, accumulator)[0]


def _as_bits(x: jax.Array) -> jax.Array:
    """A 16-bit float ``x`` as ``uint16``, the form in which the kept layer inputs and the bf16
    gradient sum live in the loops (other dtypes as they are).

    Both are updated with ``dynamic-update-slice``, which XLA's CPU backend, lacking a bf16 one,
    runs on an f32 copy of the whole stack (see ``_slot``). The backward pass reads each kept input
    only through the layer's f32 norm; kept as floats, the whole ``[L, B, T, D]`` stack was stored
    converted to f32 (0.12 GiB more at LLaMA-7B, seq 512, bf16).
    """
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if _is_16_bit_float(x) else x


def _from_bits(bits: jax.Array, dtype) -> jax.Array:
    return bits if bits.dtype == dtype else jax.lax.bitcast_convert_type(bits, dtype)


def _forward(apply, x, trained, frozen, per_layer, shared, accumulator):
    def body(x, index):
        layer = _slot((trained, frozen, per_layer), index)
        return apply(x, *layer, shared), _as_bits(x)  # the layer's input is all the backward pass keeps

    x_out, inputs = jax.lax.scan(body, x, jnp.arange(jax.tree.leaves(trained)[0].shape[0]))
    return x_out, (inputs, trained, frozen, per_layer, shared, accumulator)  # inputs: [L, *x.shape] as bits


def _backward(apply, residuals, grad_out):
    inputs, trained, frozen, per_layer, shared, accumulator = residuals
    layers = inputs.shape[0]

    def layer_vjp(index, grad_x):  # (d input, d trained) of layer ``index``, recomputed from its input
        frozen_i, per_layer_i = _slot(frozen, index), _slot(per_layer, index)
        x_i = _from_bits(inputs[index], grad_x.dtype)
        _, pullback = jax.vjp(lambda x, t: apply(x, t, frozen_i, per_layer_i, shared), x_i,
                              _slot(trained, index))
        return pullback(grad_x)

    def step(carry, index):
        grad_x, grads = carry
        grad_x, grad_layer = layer_vjp(index, grad_x)
        grads = jax.tree.map(lambda buf, g: _add_to_slot(buf, index, g), grads, grad_layer)  # buf: not used after
        return (grad_x, grads), None

    start = jax.tree.map(jnp.zeros_like, trained) if accumulator is None else accumulator
    (grad_x, grads), _ = jax.lax.scan(step, (grad_out, jax.tree.map(_as_bits, start)), jnp.arange(layers - 1, -1, -1))
    return grad_x, jax.tree.map(lambda bits, like: _from_bits(bits, like.dtype), grads, trained), None, None, None, None


checkpointed_layers.defvjp(_forward, _backward)
