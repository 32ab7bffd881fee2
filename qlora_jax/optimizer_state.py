"""AdamW's moments in float32 whatever the adapters' dtype (``lora.dtype``), as bitsandbytes' 32-bit optimizers.

optax sizes its state like the parameters it is given (``scale_by_adam``'s second moment always
takes the parameters' dtype), so bf16 adapters would get bf16 moments. The paper trains bf16 adapters
with a 32-bit AdamW: bitsandbytes keeps float32 state and does the update's math in float32,
rounding only the new parameter to bf16. ``float32_state`` does the same around any optax
transformation.
"""

import jax
import jax.numpy as jnp
import optax


def _float32(tree):
    return jax.tree.map(lambda leaf: leaf.astype(jnp.float32) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf,
                        tree)


def float32_state(inner: optax.GradientTransformationExtraArgs) -> optax.GradientTransformationExtraArgs:
    """``inner`` initialized from, and updated with, float32 copies of the parameters and gradients.

    Its state is float32, and so are the updates it returns; ``optax.apply_updates`` adds them to
    the parameters in float32 and rounds the sum to each parameter's dtype. For float32 adapters
    this is ``inner`` itself (the casts do nothing). The casts are element-wise, so XLA fuses them
    into the update instead of writing float32 copies.
    """

    def update(updates, state, params=None, **extra_args):
        return inner.update(_float32(updates), state, None if params is None else _float32(params), **extra_args)

    return optax.GradientTransformationExtraArgs(lambda params: inner.init(_float32(params)), update)
