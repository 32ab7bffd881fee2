"""Gradient clipping by global norm that XLA fuses into the optimizer's update."""

import jax
import jax.numpy as jnp
import optax


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scales all updates by ``min(1, max_norm / global_norm)``: one factor for every element, as
    ``torch.nn.utils.clip_grad_norm_`` applies it (without torch's 1e-6 added to the norm, so the
    threshold and the clipped norm are optax's).

    optax's own ``clip_by_global_norm`` divides every element by the norm; XLA does not
    duplicate a division into several consumers, so the clipped gradients are written out as a
    second full copy (at 65B: 3 GiB). A multiply by one scalar factor fuses into AdamW's moment
    updates instead. The state is optax's empty state, as theirs.
    """

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda u: u * factor.astype(u.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)
