"""The LLaMA-family decoder (LLaMA 1/2/3.x, Mistral, SmolLM2, Qwen2) in Flax NNX.

Shape letters: B batch, T tokens (queries), S cached/key positions, D model width,
H query heads, G key/value heads, K head dim, F MLP width, R LoRA rank, V vocab.
Linear layers are ``QLoRALinear`` (frozen 4-bit base + LoRA, see ``lora.py``);
embeddings, norms and lm_head stay unquantized and frozen. Positions count only
real tokens (``cumsum(attention_mask) - 1``), as transformers' ``generate`` does, so
left and right padding give the same logits at real positions.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from .config import LoraConfig, ModelConfig, QuantConfig, RopeConfig
from .layer_scan import checkpointed_layers
from .lora import Frozen, LoRAParam, QLoRALinear


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> jax.Array:
    """Rotary inverse frequencies ``f32[K/2]``, with linear or LLaMA-3.1 scaling (transformers' formulas)."""
    inv_freq = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * jnp.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate ``x: [B, T, N, K]`` by ``positions: i32[B, T]`` (rotate-half convention, f32 math)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, K/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, K]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class RMSNorm(nnx.Module):
    """``x / rms(x) * weight``, computed in f32 and cast back (transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        self.weight = Frozen(jnp.ones((dim,), jnp.bfloat16))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(jnp.float32) * normed.astype(x.dtype).astype(jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for decoding.

    ``keys``/``values``: ``[L, B, S, G, K]``; ``mask``: ``bool[B, S]`` (which slots hold
    real tokens); ``positions``: ``i32[B]`` next rotary position; ``length``: ``i32[]``
    slots filled so far.
    """

    keys: jax.Array
    values: jax.Array
    mask: jax.Array
    positions: jax.Array
    length: jax.Array

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> "KVCache":
        shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   mask=jnp.zeros((batch, max_len), bool), positions=jnp.zeros((batch,), jnp.int32),
                   length=jnp.zeros((), jnp.int32))


def _projection(config: ModelConfig, name: str, quant: QuantConfig, lora: LoraConfig | None, compute_dtype,
                rngs: nnx.Rngs, use_bias: bool = False) -> QLoRALinear:
    """The linear layer ``name`` (q_proj ... down_proj) of a block, with an adapter if ``lora`` targets it."""
    out_features, in_features = config.linear_shapes()[name]
    target_lora = lora if lora is not None and name in lora.targets else None
    return QLoRALinear(in_features, out_features, quant=quant, lora=target_lora, use_bias=use_bias,
                       compute_dtype=compute_dtype, rngs=rngs)


class Attention(nnx.Module):
    """Grouped-query attention with rotary embeddings, causal + padding (+ sliding window) mask."""

    def __init__(self, config: ModelConfig, *, quant: QuantConfig, lora: LoraConfig | None, compute_dtype,
                 rngs: nnx.Rngs):
        self.config = config

        def linear(name, bias):
            return _projection(config, name, quant, lora, compute_dtype, rngs, use_bias=bias)

        self.q_proj = linear("q_proj", config.attention_bias)
        self.k_proj = linear("k_proj", config.attention_bias)
        self.v_proj = linear("v_proj", config.attention_bias)
        self.o_proj = linear("o_proj", False)

    def __call__(self, x, positions, key_mask, inv_freq, *, rngs=None, past_keys=None, past_values=None,
                 key_positions=None):
        """``x: [B, T, D]``; ``key_mask: bool[B, S]``; returns (``[B, T, D]``, keys, values of all S slots)."""
        c = self.config
        batch, tokens, _ = x.shape
        q = self.q_proj(x, rngs).reshape(batch, tokens, c.num_attention_heads, c.head_dim)  # [B, T, H, K]
        k = self.k_proj(x, rngs).reshape(batch, tokens, c.num_key_value_heads, c.head_dim)  # [B, T, G, K]
        v = self.v_proj(x, rngs).reshape(batch, tokens, c.num_key_value_heads, c.head_dim)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if past_keys is not None:
            k, v = past_keys(k), past_values(v)  # write this step into the cache: [B, S, G, K]
        else:
            key_positions = positions
        allowed = key_mask[:, None, :] & (key_positions[:, None, :] <= positions[:, :, None])  # [B, T, S]
        if c.sliding_window is not None:
            allowed = allowed & (positions[:, :, None] - key_positions[:, None, :] < c.sliding_window)
        implementation = attention_implementation(jax.default_backend(), q.dtype, c.head_dim, tokens, k.shape[1])
        out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=allowed[:, None],
                                           implementation=implementation)
        return self.o_proj(out.reshape(batch, tokens, c.num_attention_heads * c.head_dim), rngs), k, v


def attention_implementation(platform: str, dtype, head_dim: int, tokens: int, keys: int) -> str | None:
    """The one rule for attention, also the memory formula's: ``"cudnn"`` (fused flash attention, which keeps
    no ``[B, H, T, S]`` probabilities for the backward pass) on a GPU in bf16/f16 where cuDNN takes the shape:
    head_dim a multiple of 8 up to 128, and even ``tokens`` (T) and ``keys`` (S), which cuDNN needs with a
    mask (so one-token decode steps stay on XLA); None (XLA, which keeps them) elsewhere."""
    supported = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    shape_ok = head_dim % 8 == 0 and head_dim <= 128 and tokens % 2 == 0 and keys % 2 == 0
    return "cudnn" if platform == "gpu" and supported and shape_ok else None


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig, *, quant: QuantConfig, lora: LoraConfig | None, compute_dtype,
                 rngs: nnx.Rngs):
        names = ("gate_proj", "up_proj", "down_proj")
        self.gate_proj, self.up_proj, self.down_proj = (
            _projection(config, name, quant, lora, compute_dtype, rngs) for name in names)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x, rngs)) * self.up_proj(x, rngs), rngs)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, quant: QuantConfig, lora: LoraConfig | None, compute_dtype,
                 rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, quant=quant, lora=lora, compute_dtype=compute_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, quant=quant, lora=lora, compute_dtype=compute_dtype, rngs=rngs)
        self.compute_dtype = compute_dtype

    def __call__(self, x, positions, key_mask, inv_freq, *, rngs=None, **cache_args):
        """``x: [B, T, D]`` (compute dtype) -> (``[B, T, D]``, keys, values)."""
        h = self.input_layernorm(x).astype(self.compute_dtype)
        attn, k, v = self.self_attn(h, positions, key_mask, inv_freq, rngs=rngs, **cache_args)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x).astype(self.compute_dtype), rngs)
        return x, k, v


def _slot(leaf, index: int):
    """``leaf[index]``, also for an abstract (``eval_shape``) leaf."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return leaf[index]


@functools.partial(jax.jit, donate_argnums=0)
def _write_into(whole: jax.Array, part: jax.Array, index) -> jax.Array:
    return whole.at[index].set(part.astype(whole.dtype))


def _write_slot(whole, part, index: int) -> jax.Array:
    """``whole`` with ``part`` in slot ``index``, in place where the backend donates; an abstract ``whole`` (a
    model being loaded) becomes zeros laid out like ``part`` with the layer axis unsplit. An abstract
    ``part`` (not loaded yet, e.g. adapters before their init) leaves ``whole`` as it is."""
    if isinstance(part, jax.ShapeDtypeStruct):
        return whole
    if isinstance(whole, jax.ShapeDtypeStruct):
        sharding = getattr(part, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):  # parallel.stacked_spec: the layer axis whole
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
        whole = jnp.zeros(whole.shape, whole.dtype, device=sharding)
    return _write_into(whole, part, index)


_REMAT_POLICIES = {  # "layer" runs through layer_scan.checkpointed_layers
    "none": None, "layer": None,
    "layer_save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # the same matmul outputs, kept in pinned host memory instead of device memory until the backward pass
    "layer_offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


class LlamaForCausalLM(nnx.Module):
    """The whole network: embed -> L x (attention + MLP) -> norm -> lm_head.

    The L decoder layers are stored stacked: ``self.layers`` is one ``DecoderLayer`` whose
    arrays carry a leading layer axis ``[L, ...]`` (created with ``nnx.vmap``, as MaxText's
    scanned layers and Levanter's ``Stacked``), and ``lax.scan`` runs over that stored state
    directly, so no step copies the weights, adapters or their gradients. ``layer(i)`` and
    ``set_layer(i, layer)`` read and write one layer as its own module (loading, adapters,
    export). ``remat``: gradient checkpointing of each layer (``config.CHECKPOINTING``).
    """

    def __init__(self, config: ModelConfig, *, quant: QuantConfig = QuantConfig(), lora: LoraConfig | None = None,
                 compute_dtype=jnp.bfloat16, remat: str = "none", rngs: nnx.Rngs):
        if remat not in _REMAT_POLICIES:
            raise ValueError(f"remat={remat!r} must be one of {list(_REMAT_POLICIES)}")
        self.config, self.quant, self.lora, self.compute_dtype = config, quant, lora, compute_dtype
        self.remat = remat
        self.embed_tokens = Frozen(jnp.zeros((config.vocab_size, config.hidden_size), jnp.bfloat16))  # [V, D]

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_layers(rngs):
            return DecoderLayer(config, quant=quant, lora=lora, compute_dtype=compute_dtype, rngs=rngs)

        self.layers = stacked_layers(rngs)  # every array [L, ...]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else Frozen(
            jnp.zeros((config.vocab_size, config.hidden_size), jnp.bfloat16))  # [V, D]

    def layer(self, index: int) -> DecoderLayer:
        """Decoder layer ``index`` as its own module, holding a copy of its slice of the stacked state."""
        layer_def, stacked = nnx.split(self.layers)
        return nnx.merge(layer_def, jax.tree.map(lambda leaf: _slot(leaf, index), stacked))

    def set_layer(self, index: int, layer: DecoderLayer) -> None:
        """Write ``layer``'s arrays (and its weights' static metadata) into slot ``index`` of the stacked layers."""
        _, stacked = nnx.split(self.layers)
        nnx.update(self.layers, jax.tree.map(lambda whole, part: _write_slot(whole, part, index), stacked,
                                             nnx.state(layer)))
        targets = {path: node for path, node in nnx.iter_graph(self.layers) if isinstance(node, QLoRALinear)}
        for path, source in nnx.iter_graph(layer):
            if isinstance(source, QLoRALinear) and source.quant.quantized:
                targets[path].weight_meta = source.weight_meta

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                      rngs: nnx.Rngs | None = None, grad_accumulator: nnx.State | None = None) -> jax.Array:
        """``input_ids: i32[B, T]`` -> final normed hidden states ``[B, T, D]`` (compute dtype).

        ``rngs`` with a ``dropout`` stream turns on LoRA dropout (training). ``grad_accumulator``
        (``remat="layer"`` only): gradients shaped like the layers' adapters, to which the backward
        pass adds theirs in place; the adapters' gradient then comes out as that sum
        (``layer_scan.checkpointed_layers``).
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        attention_mask = attention_mask.astype(bool)
        positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)
        inv_freq = rope_inv_freq(self.config.rope, self.config.head_dim)
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.compute_dtype)
        layers = self.config.num_hidden_layers
        keys = jax.random.split(rngs.dropout(), layers) if rngs is not None else jnp.zeros((layers,))
        layer_def, trained, frozen = nnx.split(self.layers, LoRAParam, ...)
        dropout = rngs is not None

        def apply(x, trained, frozen, key, shared):  # one decoder layer, on its slice of the stored state
            positions, attention_mask, inv_freq = shared
            layer_rngs = nnx.Rngs(dropout=key) if dropout else None
            return nnx.merge(layer_def, trained, frozen)(x, positions, attention_mask, inv_freq, rngs=layer_rngs)[0]

        shared = (positions, attention_mask, inv_freq)
        if self.remat == "layer":  # recomputes each layer from its input; can accumulate gradients in place
            x = checkpointed_layers(apply, x, trained, frozen, keys, shared, grad_accumulator)
        else:
            if grad_accumulator is not None:
                raise ValueError(f"grad_accumulator needs remat='layer', not {self.remat!r}")

            def body(x, layer):
                return apply(x, *layer, shared), None

            if self.remat != "none":  # the policy's matmul outputs are kept (on the device or the host)
                body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.remat])
            x, _ = jax.lax.scan(body, x, (trained, frozen, keys))
        return self.norm(x).astype(self.compute_dtype)

    def unembedding(self) -> jax.Array:
        """The ``[V, D]`` output matrix (the embedding when tied)."""
        return (self.embed_tokens if self.lm_head is None else self.lm_head)[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``[B, T, D]`` -> f32 logits ``[B, T, V]``."""
        w = self.unembedding().astype(self.compute_dtype)
        return jnp.einsum("btd,vd->btv", hidden, w, preferred_element_type=jnp.float32)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """``input_ids: i32[B, T]``, ``attention_mask: [B, T]`` (1 = real token) -> f32 logits ``[B, T, V]``.

        Logits at padded positions are unspecified.
        """
        return self.logits(self.hidden_states(input_ids, attention_mask, rngs=rngs))

    def decode(self, input_ids: jax.Array, attention_mask: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Run ``input_ids: i32[B, T]`` (prompt chunk or one new token) against ``cache``.

        ``attention_mask: [B, T]`` marks real tokens of this chunk. Returns f32 logits
        ``[B, T, V]`` and the cache with these T slots appended.
        """
        attention_mask = attention_mask.astype(bool)
        start = cache.length
        positions = (cache.positions[:, None] + jnp.cumsum(attention_mask, axis=-1) - 1).astype(jnp.int32)
        positions = jnp.maximum(positions, 0)
        tokens = input_ids.shape[1]
        key_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, start))
        slot_positions = jnp.maximum(jnp.cumsum(key_mask, axis=-1) - 1, 0).astype(jnp.int32)
        inv_freq = rope_inv_freq(self.config.rope, self.config.head_dim)
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.compute_dtype)
        layer_def, stacked = nnx.split(self.layers)

        def body(x, inputs):  # one layer on its slice of the stored state and of the cache ([B, S, G, K])
            state, layer_keys, layer_values = inputs

            def write_keys(k):
                return jax.lax.dynamic_update_slice(layer_keys, k.astype(layer_keys.dtype), (0, start, 0, 0))

            def write_values(v):
                return jax.lax.dynamic_update_slice(layer_values, v.astype(layer_values.dtype), (0, start, 0, 0))

            x, k, v = nnx.merge(layer_def, state)(x, positions, key_mask, inv_freq, past_keys=write_keys,
                                                  past_values=write_values, key_positions=slot_positions)
            return x, (k, v)

        x, (new_keys, new_values) = jax.lax.scan(body, x, (stacked, cache.keys, cache.values))
        logits = self.logits(self.norm(x).astype(self.compute_dtype))
        new_cache = KVCache(keys=new_keys, values=new_values, mask=key_mask,
                            positions=cache.positions + jnp.sum(attention_mask, axis=-1).astype(jnp.int32),
                            length=start + tokens)
        return logits, new_cache
