"""Gradient clipping by global norm that XLA fuses into the optimizer's update."""

import jax
import jax.numpy as jnp
import optax


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """Scales all updates by ``min(1, max_norm / global_norm)``: one factor for every element, as
    ``torch.nn.utils.clip_grad_norm_`` applies it (without torch's 1e-6 added to the norm, so the
    threshold and the clipped norm are optax's).

    optax's own ``clip_by_global_norm`` divides every element by the norm; XLA does not
    duplicate a division into several consumers, so the clipped gradients are written out as a
    second full copy (at 65B: 3 GiB). A multiply by one scalar factor fuses into AdamW's moment
    updates instead. The state is optax's empty state, as theirs.

    ``update(..., global_norm=norm)`` takes the norm of all the updates from the caller (a float32
    scalar): the train step has computed it already, and the host-offloaded update
    (``qlora_jax.offload``) sees one decoder layer at a time, whose own norm is not the global one.
    """

    def update(updates, state, params=None, *, global_norm=None, **extra_args):
        del params, extra_args
        norm = optax.tree.norm(updates) if global_norm is None else global_norm
        factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda u: u * factor.astype(u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)
