"""Text generation with the KV cache: greedy or sampled, batched prompts of different lengths."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .model import KVCache, LlamaForCausalLM
from .tokenizer import Tokenizer


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "greedy"))
def _generate_ids(model: LlamaForCausalLM, ids: jax.Array, mask: jax.Array, key: jax.Array, temperature: jax.Array,
                  *, max_new_tokens: int, greedy: bool) -> jax.Array:
    """Left-padded ``ids: i32[B, T]`` -> ``i32[B, max_new_tokens]`` continuation."""
    batch, prompt_len = ids.shape
    cache = KVCache.empty(model.config, batch, prompt_len + max_new_tokens, model.compute_dtype)
    logits, cache = model.decode(ids, mask, cache)
    last = logits[:, -1]

    def pick(logits_row, step_key):
        if greedy:
            return jnp.argmax(logits_row, axis=-1).astype(jnp.int32)
        return jax.random.categorical(step_key, logits_row / temperature).astype(jnp.int32)

    def step(carry, step_key):
        cache, last_logits = carry
        token = pick(last_logits, step_key)
        logits, cache = model.decode(token[:, None], jnp.ones((batch, 1), bool), cache)
        return (cache, logits[:, -1]), token

    keys = jax.random.split(key, max_new_tokens)
    _, tokens = jax.lax.scan(step, (cache, last), keys)
    return tokens.T


def generate(model: LlamaForCausalLM, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int = 32,
             temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Continue each prompt (already formatted, e.g. by ``apply_chat_template``); stops at EOS."""
    encoded = [tokenizer.encode(p) for p in prompts]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    ids = np.full((len(encoded), width), pad, np.int32)
    mask = np.zeros((len(encoded), width), bool)
    for row, tokens in enumerate(encoded):  # left padding: every prompt ends at the last column
        ids[row, width - len(tokens):] = tokens
        mask[row, width - len(tokens):] = True
    out = _generate_ids(model, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed),
                        jnp.float32(max(temperature, 1e-6)), max_new_tokens=max_new_tokens,
                        greedy=temperature == 0.0)
    texts = []
    for row in np.asarray(out):
        tokens = list(row)
        if tokenizer.eos_id is not None and tokenizer.eos_id in tokens:
            tokens = tokens[: tokens.index(tokenizer.eos_id)]
        texts.append(tokenizer.decode(tokens))
    return texts
