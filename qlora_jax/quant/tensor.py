"""``QuantizedTensor``: a 4-bit tensor in bitsandbytes' layout, as a JAX pytree."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import blockwise
from . import cpu_kernel as kernel_module
from .codebooks import QUANT_TYPES

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A tensor stored as 4-bit codes plus blockwise absmax (see ``qlora_jax.quant`` for the format).

    Array fields (pytree leaves):
      packed: ``u8[ceil(numel / 2)]`` codes, two per byte, element 2i in the high nibble.
      absmax: ``f32[N]`` per-block scale (``double_quant=False``), or ``u8[N]`` codes of
        ``absmax - offset`` in the signed dynamic map (``double_quant=True``).
      nested_absmax: ``f32[ceil(N / 256)]`` scale of the absmax codes (double quant only).
      offset: ``f32[]`` mean of the fp32 absmax (double quant only).
    Static fields: ``shape``, ``dtype`` (of the original tensor, a numpy dtype name),
    ``blocksize``, ``quant_type``.
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None
    offset: jax.Array | None
    shape: tuple[int, ...]
    dtype: str
    blocksize: int
    quant_type: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def num_blocks(self) -> int:
        return blockwise.num_blocks(self.numel, self.blocksize)

    def nbytes(self) -> int:
        """Bytes held by the array fields."""
        leaves = [self.packed, self.absmax, self.nested_absmax, self.offset]
        return sum(int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize for leaf in leaves if leaf is not None)

    def bits_per_parameter(self) -> float:
        """Stored bits per element: 4 + 32/blocksize, or 4 + 8/blocksize + 32/(256 * blocksize) with double quant."""
        return 8 * self.nbytes() / self.numel

    def absmax_f32(self) -> jax.Array:
        """The per-block absmax as ``f32[N]``, decoding double quantization when present."""
        if not self.double_quant:
            return self.absmax
        return blockwise.double_dequantize(self.absmax, self.nested_absmax, self.offset)

    def to_bnb_state_dict(self, prefix: str) -> dict[str, np.ndarray]:
        from .bnb_format import to_bnb_state_dict

        return to_bnb_state_dict(self, prefix)

    @classmethod
    def from_bnb_state_dict(cls, state_dict: dict[str, np.ndarray], prefix: str) -> "QuantizedTensor":
        from .bnb_format import from_bnb_state_dict

        return from_bnb_state_dict(state_dict, prefix)


jax.tree_util.register_dataclass(
    QuantizedTensor,
    data_fields=["packed", "absmax", "nested_absmax", "offset"],
    meta_fields=["shape", "dtype", "blocksize", "quant_type"],
)


def validate_quant_args(quant_type: str, blocksize: int) -> None:
    """Raise ``ValueError`` for a quant type or blocksize that bitsandbytes' format does not define."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not supported; expected one of {QUANT_TYPES}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} is not supported; expected one of {BLOCKSIZES}")


def _check_input(x: jax.Array) -> None:
    if not any(x.dtype == d for d in _FLOAT_DTYPES):
        raise TypeError(f"quantize expects a float32, bfloat16 or float16 array, got dtype {x.dtype}")
    if x.size == 0:
        raise ValueError(f"quantize got an empty array of shape {x.shape}")
    if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
        bad = int(jnp.sum(~jnp.isfinite(x)))
        raise ValueError(f"quantize got {bad} NaN/Inf value(s) in an array of shape {x.shape}; "
                         "non-finite weights cannot be encoded")


def quantize(x: jax.Array, quant_type: str = "nf4", blocksize: int = 64,
             double_quant: bool = True) -> QuantizedTensor:
    """Quantize ``x`` (any shape, f32/bf16/f16) to 4 bits exactly as bitsandbytes' CPU path does.

    ``double_quant`` is bnb's ``compress_statistics``. Under ``jax.jit`` the NaN/Inf
    check cannot raise; a block holding NaN/Inf then gets a NaN absmax instead.
    """
    validate_quant_args(quant_type, blocksize)
    x = jnp.asarray(x)
    _check_input(x)
    return _quantize(x, quant_type, blocksize, double_quant)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(x: jax.Array, quant_type: str, blocksize: int, double_quant: bool) -> QuantizedTensor:
    flat = x.reshape(-1).astype(jnp.float32)
    codes, absmax = blockwise.quantize_4bit_codes(flat, blocksize, quant_type)
    nested_absmax = offset = None
    if double_quant:
        absmax, nested_absmax, offset = blockwise.double_quantize(absmax)
    return QuantizedTensor(packed=blockwise.pack_nibbles(codes), absmax=absmax, nested_absmax=nested_absmax,
                           offset=offset, shape=tuple(x.shape), dtype=jnp.dtype(x.dtype).name,
                           blocksize=blocksize, quant_type=quant_type)


def dequantize(q: QuantizedTensor, dtype=jnp.bfloat16, cpu_kernel: bool = True) -> jax.Array:
    """Decode ``q`` to an array of its original shape: values are computed in f32, then cast to ``dtype``.

    On the CPU the decode runs in the C++ kernel of ``quant.cpu_kernel`` where it is built and
    enabled; ``cpu_kernel=False`` keeps it on the XLA path there too (the same bits; for comparisons).
    """
    return _dequantize(q, jnp.dtype(dtype), cpu_kernel and kernel_module.enabled())


@functools.partial(jax.jit, static_argnums=(1, 2))
def _dequantize(q: QuantizedTensor, dtype: jnp.dtype, use_cpu_kernel: bool) -> jax.Array:
    padding = q.num_blocks * q.blocksize // 2 - q.packed.shape[0]  # a partial last block decodes padded, then cut
    packed = jnp.pad(q.packed, (0, padding)) if padding else q.packed
    blocks = packed.reshape(q.num_blocks, -1)
    if use_cpu_kernel:
        values = kernel_module.decode_blocks(blocks, q.absmax, q.quant_type, dtype, q.nested_absmax, q.offset)
    else:
        values = blockwise.decode_blocks(blocks, q.absmax_f32(), q.quant_type, dtype)
    return values.reshape(-1)[:q.numel].reshape(q.shape)
