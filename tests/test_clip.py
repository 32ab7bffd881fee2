"""Gradient clipping by global norm: optax's result, without a clipped copy of the gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qlora_jax.clip import clip_by_global_norm


def _gradients(scale: float) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(0), 2)
    return {"a": scale * jax.random.normal(keys[0], (8, 32)), "b": scale * jax.random.normal(keys[1], (32, 4))}


def test_clipping_scales_by_max_norm_over_the_global_norm_as_optax_does():
    ours, theirs = clip_by_global_norm(0.3), optax.clip_by_global_norm(0.3)
    for scale, clipped in ((1.0, True), (1e-3, False)):
        grads = _gradients(scale)
        got, state = ours.update(grads, ours.init(grads))
        want, _ = theirs.update(grads, theirs.init(grads))
        assert state == theirs.init(grads)  # the same (empty) state: checkpoints restore either way
        norm = float(optax.tree.norm(got))
        if clipped:
            assert abs(norm - 0.3) < 1e-6
            for name in grads:
                np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=0)
        else:
            for name in grads:
                np.testing.assert_array_equal(got[name], grads[name])


def test_the_clipped_update_writes_no_copy_of_the_gradients():
    """optax's clip divides every element by the norm, and XLA writes the quotient out before AdamW reads it
    twice (a gradient-sized buffer: 3 GiB at LLaMA-65B, r=64); a multiply by one factor fuses into AdamW."""
    params = {"a": jnp.zeros((16, 256, 64)), "b": jnp.zeros((16, 64, 256))}  # 2 x 1 MiB

    def temporaries(clip) -> int:
        tx = optax.chain(clip(0.3), optax.adamw(1e-3))

        def update(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        step = jax.jit(update, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
        return step.memory_analysis().temp_size_in_bytes

    assert temporaries(optax.clip_by_global_norm) >= 2 * 2**20
    assert temporaries(clip_by_global_norm) < 2**16


def test_a_given_global_norm_clips_a_part_of_the_gradients_as_the_whole():
    """The host-offloaded update (``qlora_jax.offload``) clips one layer at a time with the norm of all layers."""
    clip = clip_by_global_norm(0.3)
    grads = _gradients(1.0)
    whole, _ = clip.update(grads, clip.init(grads))
    part, _ = clip.update({"a": grads["a"]}, clip.init({"a": grads["a"]}), global_norm=optax.tree.norm(grads))
    np.testing.assert_array_equal(part["a"], whole["a"])
    alone, _ = clip.update({"a": grads["a"]}, clip.init({"a": grads["a"]}))
    assert not np.allclose(alone["a"], whole["a"])  # its own norm would clip it differently
