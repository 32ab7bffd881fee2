"""The optimizer update over state kept in host memory, one decoder layer at a time (``optimizer.offload``).

Copying the whole AdamW state to the device for the update puts it all there at once, plus its
updated copy: compiled for a GPU, LLaMA-65B's step with ``offload: host`` peaked 4.7 GiB above
the step that keeps the state on the device (``benchmarks/results/gpu_h200``). Every LoRA
leaf has the stacked layers' leading axis, so the update runs as a ``lax.scan`` over that axis
instead: each step copies one layer's slice of the state to the device, updates it, and copies it
back, so one layer's state (at 65B, 1/80 of 6 GiB) is on the device at a time. The LoRA parameters
are the loop's carry, updated one layer at a time in place (as scan outputs they were a second
gradient-sized buffer: 3 GiB at 65B).
"""

import jax
import jax.numpy as jnp
import optax
from optax.tree_utils import tree_map_params


def _split(tx, state):
    """``(per_layer, shared)``: ``state`` with its parameter-shaped leaves, else its other leaves (the step
    counts), the rest of each replaced by None."""
    per_layer = tree_map_params(tx, lambda leaf: leaf, state, transform_non_params=lambda _: None)
    shared = tree_map_params(tx, lambda _: None, state)
    return per_layer, shared


def _merge(per_layer, shared):
    return jax.tree.map(lambda leaf, other: other if leaf is None else leaf, per_layer, shared,
                        is_leaf=lambda leaf: leaf is None)


def update_by_layer(tx: optax.GradientTransformationExtraArgs, lora, opt_state, grads, global_norm: jax.Array,
                    applied: jax.Array, params_on_host: bool):
    """``(new_lora, new_opt_state)``: ``tx``'s update applied where ``applied`` (a bool scalar), else the inputs.

    ``lora``, ``grads``: device arrays, every leaf ``[L, ...]`` (the decoder layers). ``opt_state``:
    ``tx``'s state in pinned host memory, its parameter-shaped leaves ``[L, ...]``; it comes back
    there. ``global_norm``: the float32 norm of all of ``grads``, which ``tx``'s clipping takes
    (``clip.clip_by_global_norm``), since it sees one layer at a time. The new LoRA parameters come
    back in host memory with ``params_on_host`` (``host_with_params``), else on the device.
    """
    per_layer, shared = _split(tx, opt_state)

    def layer(lora, inputs):
        index, layer_grads, layer_state = inputs
        params = jax.tree.map(lambda leaf: leaf[index], lora)
        state = jax.device_put(_merge(layer_state, shared), jax.memory.Space.Device)
        updates, new_state = tx.update(layer_grads, state, params, global_norm=global_norm)
        new_params = optax.apply_updates(params, updates)
        new_params, new_state = jax.tree.map(lambda new, old: jnp.where(applied, new, old),
                                             (new_params, new_state), (params, state))
        lora = jax.tree.map(lambda leaf, new: leaf.at[index].set(new), lora, new_params)  # in place
        new_layer_state, new_shared = _split(tx, new_state)
        return lora, (jax.device_put(new_layer_state, jax.memory.Space.Host), new_shared)

    layers = jax.tree.leaves(lora)[0].shape[0]
    new_lora, (new_per_layer, new_shared) = jax.lax.scan(layer, lora, (jnp.arange(layers), grads, per_layer))
    if params_on_host:
        new_lora = jax.device_put(new_lora, jax.memory.Space.Host)
    new_shared = jax.tree.map(lambda leaf: leaf[0], new_shared)  # every layer counted the same step
    return new_lora, _merge(new_per_layer, jax.device_put(new_shared, jax.memory.Space.Host))
