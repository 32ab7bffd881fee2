"""Next-token cross entropy without materializing the whole ``[B, T, V]`` logits.

With a 128k vocabulary the f32 logits are the largest activation of a training step
(``B * T * V * 4`` bytes, and as much again for their gradient). ``token_loss`` runs
the output projection and the cross entropy over chunks of ``chunk`` tokens in a
``lax.scan``, each chunk under ``jax.checkpoint``: the forward pass keeps only the
chunk's inputs, and the backward pass recomputes one chunk's logits at a time. So
at most ``[B, chunk, V]`` logits exist at once.
"""

import jax
import jax.numpy as jnp
import optax

from .data import IGNORE


@jax.custom_vjp
def _logits(hidden: jax.Array, unembedding: jax.Array) -> jax.Array:
    """``hidden: [B, C, D]``, ``unembedding: [V, D]`` (same dtype) -> ``f32[B, C, V]``.

    The output matrix is frozen: its cotangent is zero. The backward product takes the
    logits' gradient in the compute dtype (as autocast does), so XLA multiplies in bf16
    when computing in bf16 instead of converting the ``[V, D]`` matrix to f32 for it.
    """
    return jnp.einsum("bcd,vd->bcv", hidden, unembedding, preferred_element_type=jnp.float32)


def _logits_forward(hidden, unembedding):
    return _logits(hidden, unembedding), unembedding


def _logits_backward(unembedding, grad):
    grad_hidden = jnp.einsum("bcv,vd->bcd", grad.astype(unembedding.dtype), unembedding,
                             preferred_element_type=jnp.float32)
    return grad_hidden.astype(unembedding.dtype), None


_logits.defvjp(_logits_forward, _logits_backward)


def _chunk_loss(hidden: jax.Array, labels: jax.Array, unembedding: jax.Array) -> jax.Array:
    """``hidden: [B, C, D]``, ``labels: i32[B, C]``, ``unembedding: [V, D]`` -> summed f32 loss of the chunk."""
    logits = _logits(hidden, unembedding.astype(hidden.dtype))  # f32[B, C, V]
    mask = labels != IGNORE
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, labels, 0))
    return jnp.sum(jnp.where(mask, losses, 0.0))


def token_loss(hidden: jax.Array, labels: jax.Array, unembedding: jax.Array, chunk: int) -> tuple[jax.Array,
                                                                                                  jax.Array]:
    """Summed cross entropy of predicting ``labels`` from ``hidden``, and the number of counted labels.

    ``hidden: [B, T, D]`` (the hidden state at position t predicts ``labels[:, t]``),
    ``labels: i32[B, T]`` with ``IGNORE`` where nothing is predicted, ``unembedding: [V, D]``.
    ``chunk``: tokens per chunk (0: all T at once).
    """
    count = jnp.sum(labels != IGNORE)
    tokens = hidden.shape[1]
    if chunk == 0 or chunk >= tokens:
        return _chunk_loss(hidden, labels, unembedding), count
    pad = -tokens % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    labels = jnp.pad(labels, ((0, 0), (0, pad)), constant_values=IGNORE)
    batch, dim = hidden.shape[0], hidden.shape[2]
    hidden_chunks = hidden.reshape(batch, -1, chunk, dim).swapaxes(0, 1)  # [T/C, B, C, D]
    label_chunks = labels.reshape(batch, -1, chunk).swapaxes(0, 1)  # [T/C, B, C]
    chunk_loss = jax.checkpoint(_chunk_loss)

    def body(total, inputs):
        return total + chunk_loss(inputs[0], inputs[1], unembedding), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden_chunks, label_chunks))
    return total, count
