"""The QLoRA linear layer: a frozen (4-bit or bf16) base weight plus a trainable LoRA adapter.

Variable types decide what trains and what is saved: ``LoRAParam`` (the adapters,
fp32 master copies) is the only thing optimizers and adapter checkpoints select;
``QuantState`` holds the packed 4-bit codes and constants (format:
``qlora_jax.quant``); ``Frozen`` holds unquantized frozen weights (embeddings,
norms, lm_head, and the base weights when ``quant_type="none"``).
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from .config import LoraConfig, QuantConfig
from .loftq import loftq
from .qmatmul import quantized_matmul
from .quant import QuantizedTensor, dequantize, quantize


class LoRAParam(nnx.Param):
    """A trainable LoRA adapter matrix."""


class QuantState(nnx.Variable):
    """Packed 4-bit codes and quantization constants of a frozen weight."""


class Frozen(nnx.Variable):
    """A frozen, unquantized weight."""


def kaiming_uniform_a_sqrt5(key: jax.Array, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
    """PEFT's ``lora_A`` init (torch's Linear default): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = shape[1]."""
    bound = 1.0 / math.sqrt(shape[1])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


@functools.cache
def _quantized_shapes(out_features: int, in_features: int, quant_type: str, blocksize: int,
                      double_quant: bool) -> QuantizedTensor:
    """Abstract arrays of a quantized ``[out, in]`` weight (cached: a 65B model has 560 linear layers)."""
    return jax.eval_shape(lambda w: quantize(w, quant_type, blocksize, double_quant),
                          jax.ShapeDtypeStruct((out_features, in_features), jnp.bfloat16))


class QLoRALinear(nnx.Module):
    """``y = x @ W.T (+ b) + scaling * dropout(x) @ A.T @ B.T`` with W frozen.

    Shapes: ``W: [out, in]`` stored quantized (``QuantState``) or as ``Frozen`` bf16;
    ``lora_a: [R, in]``, ``lora_b: [out, R]`` (PEFT's layout) in ``lora.dtype`` (f32 unless
    configured bf16; drawn in f32 and rounded); ``bias: [out]`` frozen. Math runs in
    ``compute_dtype`` with f32 accumulation.

    DoRA (``lora.dora``) adds ``lora_magnitude: f32[out]`` (PEFT's ``lora_magnitude_vector``) and
    rescales each output feature by ``magnitude / ||W + scaling * B @ A||`` (row norm, held constant
    in the backward pass as DoRA section 4.3 and PEFT do), as PEFT computes it:
    ``y = base(x) + (m/n - 1) * base_nobias(dropout(x)) + m/n * scaling * lora(dropout(x))``.
    """

    def __init__(self, in_features: int, out_features: int, *, quant: QuantConfig, lora: LoraConfig | None,
                 use_bias: bool = False, compute_dtype=jnp.bfloat16, rngs: nnx.Rngs):
        if in_features < 1 or out_features < 1:
            raise ValueError(f"QLoRALinear needs positive sizes, got in={in_features}, out={out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.quant = quant
        if quant.quantized:  # placeholders of the right shapes; the loader fills them
            shapes = _quantized_shapes(out_features, in_features, quant.quant_type, quant.blocksize,
                                       quant.double_quant)
            self.packed = QuantState(jnp.zeros(shapes.packed.shape, shapes.packed.dtype))
            self.absmax = QuantState(jnp.zeros(shapes.absmax.shape, shapes.absmax.dtype))
            self.nested_absmax = QuantState(jnp.zeros(shapes.nested_absmax.shape)) if quant.double_quant else None
            self.offset = QuantState(jnp.zeros(())) if quant.double_quant else None
            self.weight_meta = ((out_features, in_features), "bfloat16", quant.blocksize, quant.quant_type)
        else:
            self.weight = Frozen(jnp.zeros((out_features, in_features), jnp.bfloat16))
        self.bias = Frozen(jnp.zeros((out_features,), jnp.bfloat16)) if use_bias else None
        self.lora = lora
        if lora is not None:
            dtype = jnp.dtype(lora.dtype)
            self.lora_a = LoRAParam(kaiming_uniform_a_sqrt5(rngs.params(), (lora.rank, in_features)).astype(dtype))
            self.lora_b = LoRAParam(jnp.zeros((out_features, lora.rank), dtype))
            # a placeholder: the loaders set it to the row norms of the loaded weight (init_lora)
            self.lora_magnitude = LoRAParam(jnp.ones((out_features,), dtype)) if lora.dora else None

    def load_weight(self, weight: jax.Array) -> None:
        """Set the frozen base weight from a full-precision ``[out, in]`` array, quantizing it if configured;
        with ``lora.init: loftq`` also the adapters (``loftq.loftq``: they need the unquantized weight)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} != ({self.out_features}, {self.in_features})")
        if self.quant.quantized and self.lora is not None and self.lora.init == "loftq":
            q, lora_a, lora_b = loftq(jnp.asarray(weight), self.quant, self.lora.rank, self.lora.scaling,
                                      self.lora.loftq_iters)
            self.load_quantized(jax.block_until_ready(q))
            self.lora_a.set_value(lora_a.astype(self.lora_a.get_value().dtype))
            self.lora_b.set_value(lora_b.astype(self.lora_b.get_value().dtype))
        elif self.quant.quantized:
            q = quantize(jnp.asarray(weight), self.quant.quant_type, self.quant.blocksize, self.quant.double_quant)
            self.load_quantized(jax.block_until_ready(q))  # one weight in flight: bounds peak memory
        else:
            self.weight.set_value(jnp.asarray(weight, jnp.bfloat16))

    def load_quantized(self, q: QuantizedTensor) -> None:
        """Set the frozen base weight from an already-quantized one (e.g. a bitsandbytes checkpoint), bit for bit."""
        if q.shape != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight shape {q.shape} != ({self.out_features}, {self.in_features})")
        if (q.quant_type, q.blocksize, q.double_quant) != (self.quant.quant_type, self.quant.blocksize,
                                                             self.quant.double_quant):
            raise ValueError(f"quantized weight is {q.quant_type}/blocksize {q.blocksize}/double_quant "
                             f"{q.double_quant}, layer expects {self.quant}")
        self.packed.set_value(q.packed)
        self.absmax.set_value(q.absmax)
        if q.double_quant:
            self.nested_absmax.set_value(q.nested_absmax)
            self.offset.set_value(q.offset)
        self.weight_meta = (q.shape, q.dtype, q.blocksize, q.quant_type)

    def quantized_weight(self) -> QuantizedTensor:
        shape, dtype, blocksize, quant_type = self.weight_meta
        nested = self.nested_absmax[...] if self.nested_absmax is not None else None
        offset = self.offset[...] if self.offset is not None else None
        return QuantizedTensor(packed=self.packed[...], absmax=self.absmax[...], nested_absmax=nested, offset=offset,
                               shape=shape, dtype=dtype, blocksize=blocksize, quant_type=quant_type)

    def base_weight(self, dtype=jnp.float32) -> jax.Array:
        """The frozen base weight ``[out, in]`` decoded to ``dtype``."""
        if self.quant.quantized:
            return dequantize(self.quantized_weight(), dtype)
        return self.weight[...].astype(dtype)

    def _base_product(self, x: jax.Array) -> jax.Array:
        """``x: [..., in] @ W.T`` -> ``[..., out]`` in ``compute_dtype`` (no bias)."""
        if self.quant.quantized:
            return quantized_matmul(x, self.quantized_weight(), self.compute_dtype, self.quant.kernel)
        w = jax.lax.stop_gradient(self.weight[...]).astype(self.compute_dtype)
        return jnp.einsum("...i,oi->...o", x.astype(self.compute_dtype), w,
                          preferred_element_type=jnp.float32).astype(self.compute_dtype)

    def weight_norm(self, lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
        """DoRA's ``f32[out]`` row norms ``||W + scaling * lora_b @ lora_a||`` without forming the ``[out, in]``
        sum: ``|W_o|^2 + 2 s b_o . (W a^T)_o + s^2 b_o (a a^T) b_o^T``, from the base decoded to f32 once."""
        w = jax.lax.stop_gradient(self.base_weight(jnp.float32))  # [out, in]
        a, b = lora_a.astype(jnp.float32), lora_b.astype(jnp.float32)
        s = self.lora.scaling
        w_a = jnp.einsum("oi,ri->or", w, a)  # [out, R]
        squares = (jnp.sum(w * w, axis=1) + 2 * s * jnp.sum(b * w_a, axis=1)
                   + s * s * jnp.sum((b @ (a @ a.T)) * b, axis=1))
        return jnp.sqrt(jnp.maximum(squares, 0.0))

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """``x: [..., in]`` -> ``[..., out]`` in ``compute_dtype``; ``rngs`` (a ``dropout`` stream) enables dropout."""
        y = self._base_product(x)
        bias = None if self.bias is None else self.bias[...].astype(self.compute_dtype)
        if self.lora is None:
            return y if bias is None else y + bias
        h = x
        if rngs is not None and self.lora.dropout > 0:
            keep = jax.random.bernoulli(rngs.dropout(), 1.0 - self.lora.dropout, x.shape)
            h = jnp.where(keep, x / (1.0 - self.lora.dropout), 0).astype(x.dtype)
        a, b = (adapter[...].astype(self.compute_dtype) for adapter in (self.lora_a, self.lora_b))
        delta = lora_product(h.astype(self.compute_dtype), a, b)
        if not self.lora.dora:
            y = y if bias is None else y + bias
            return (y.astype(jnp.float32) + self.lora.scaling * delta).astype(self.compute_dtype)
        norm = jax.lax.stop_gradient(self.weight_norm(self.lora_a[...], self.lora_b[...]))
        scale = self.lora_magnitude[...].astype(jnp.float32) / norm  # [out]
        base = y if h is x else self._base_product(h)  # PEFT rescales the product of the dropped-out input
        out = y.astype(jnp.float32) + (scale - 1) * base.astype(jnp.float32) + scale * self.lora.scaling * delta
        return (out if bias is None else out + bias.astype(jnp.float32)).astype(self.compute_dtype)

    def quant_nbytes(self) -> int:
        """Bytes of the frozen base weight as held (packed codes + constants, or bf16)."""
        if self.quant.quantized:
            return self.quantized_weight().nbytes()
        return self.weight[...].size * self.weight[...].dtype.itemsize


@jax.custom_vjp
def lora_product(h: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``f32[..., out] = (h @ a.T) @ b.T`` for ``h: [..., in]``, ``a: [R, in]``, ``b: [out, R]`` (compute dtype).

    Its own backward pass, for the layout of one product: ``d(b) = g.T @ low`` as autodiff
    writes it makes XLA's CPU backend copy the f32 output gradient ``g: [BT, out]`` (the
    SwiGLU backward's output, for gate/up) into a transposed layout on every step. Here
    ``d(b)`` is computed as ``(low.T @ g).T``: ``g`` is read as it lies, only the small
    ``[R, out]`` result is transposed, and an optimization barrier keeps XLA from folding that
    transpose back into the product.
    """
    return _lora_product_forward(h, a, b)[0]


def _lora_product_forward(h, a, b):
    low = jnp.einsum("...i,ri->...r", h, a, preferred_element_type=jnp.float32).astype(h.dtype)  # [..., R]
    return jnp.einsum("...r,or->...o", low, b, preferred_element_type=jnp.float32), (h, a, b, low)


def _lora_product_backward(residuals, g):
    h, a, b, low = residuals  # g: f32[..., out]
    dlow = jnp.einsum("...o,or->...r", g, b.astype(jnp.float32)).astype(h.dtype)  # [..., R]
    dh = jnp.einsum("...r,ri->...i", dlow, a, preferred_element_type=jnp.float32).astype(h.dtype)
    da = jnp.einsum("...r,...i->ri", dlow, h, preferred_element_type=jnp.float32).astype(a.dtype)
    db_t = jax.lax.optimization_barrier(jnp.einsum("...r,...o->ro", low.astype(jnp.float32), g))  # [R, out]
    return dh, da, db_t.T.astype(b.dtype)


lora_product.defvjp(_lora_product_forward, _lora_product_backward)


def init_lora(layers: nnx.Module, seed: int) -> None:
    """PEFT's init for every adapter of the stacked decoder ``layers`` (each array ``[L, ...]``), in place:
    ``lora_a`` Kaiming-uniform (a = sqrt(5)), ``lora_b`` zeros (LoftQ adapters keep what ``load_weight`` fitted),
    then DoRA magnitudes: the row norms of ``W + scaling * B @ A``. The one LoRA initializer of models whose
    weights are filled after ``nnx.eval_shape`` (loading, random test models).

    Adapter number ``n`` (layer by layer, in graph order within a layer) draws from ``fold_in(key(seed), n)``.
    """
    key = jax.random.key(seed)
    adapted = [m for _, m in nnx.iter_graph(layers) if isinstance(m, QLoRALinear) and m.lora is not None]
    for position, module in enumerate(adapted):  # stacked: each module holds its adapter of every layer
        if module.lora.init == "loftq":
            if not module.quant.quantized:
                raise ValueError("lora.init: loftq fits the quantization error; the base is not quantized")
            continue
        a, b = module.lora_a.get_value(), module.lora_b.get_value()
        module.lora_a.set_value(jnp.stack([
            kaiming_uniform_a_sqrt5(jax.random.fold_in(key, i * len(adapted) + position), a.shape[1:])
            for i in range(a.shape[0])]).astype(a.dtype))
        module.lora_b.set_value(jnp.zeros(b.shape, b.dtype))
    for module in adapted:
        if module.lora.dora:
            module.lora_magnitude.set_value(stacked_weight_norms(module).astype(module.lora_magnitude.get_value().dtype))


def stacked_weight_norms(module: QLoRALinear) -> jax.Array:
    """``f32[L, out]``: ``weight_norm`` of each layer of a stacked projection, one layer decoded at a time."""
    graphdef, state = nnx.split(module)

    def one_layer(layer_state):
        layer = nnx.merge(graphdef, layer_state)
        return layer.weight_norm(layer.lora_a[...], layer.lora_b[...])

    return jax.jit(lambda state: jax.lax.map(one_layer, state))(state)
