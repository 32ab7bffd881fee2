"""Blockwise absmax quantization as bitsandbytes 0.50 computes it on the CPU: pure ``jnp``.

All functions work on the flat, row-major ``f32[n]`` view of a tensor (the order
in which torch flattens a ``[out_features, in_features]`` weight). Blocks are
consecutive runs of ``blocksize`` elements; the last block may be partial.

Where bnb's CUDA kernel would differ from its CPU oracle (documented, not emulated):
- 4-bit codes: the CUDA kernel scales by ``x * (1 / absmax)`` in every block and
  resolves midpoint ties with its own comparison tree; the CPU path divides the
  partial last block (``x / absmax``) and sends a value on a midpoint to the lower
  code. On random data the two agree except on exact midpoints.
- double quantization: bnb 0.50's CPU library rounds ``x / nested_absmax`` to the
  8-bit map through a 65536-slot lookup table (slot ``floor((x + 1) * 32767.5 + 0.5)``,
  each slot holding the code nearest to its centre), so a value within 1.5e-5 of a
  midpoint can take the farther code; the CUDA kernel searches for the exact
  nearest code. We follow the CPU table (measured against bnb 0.50.2 on 150k
  values, tests/test_quant.py checks the fixtures).
- subnormal inputs: XLA on the CPU flushes subnormal floats (|x| < 2**-126) to
  zero. Real weights hold none; a subnormal element is treated as 0.0, which for
  FP4/Int4 can pick code 0 where bnb picks code 8 (both decode to 0.0).
- all-zero tensors with double quantization: bnb's CPU path clamps every block's
  absmax to 1e-38 and stores their mean, a subnormal float32 (about 1e-38), as the
  offset; XLA flushes it, so our offset is 0.0, the nested absmax 0.0, and at
  blocksize 32 one absmax code differs. Both state dicts decode the tensor to exact
  zeros (tests/test_quant.py), so only those stored bytes differ.
"""

import jax.numpy as jnp
from jax import lax

from .codebooks import codebook, dynamic_map_lut, dynamic_map_signed, rounding_bounds
from .torch_sum import torch_cpu_mean

NESTED_BLOCKSIZE = 256  # bnb's blocksize for double quantization of absmax
_TINY_BITS = 0x006CE3EE  # float32 1e-38 (subnormal): bnb's floor for the absmax of a partial block
_LUT_SIZE, _LUT_SCALE = 65536, 32767.5  # bnb's 8-bit CPU quantizer: slot = (x + 1) * 32767.5, rounded


def rounded(product: jnp.ndarray) -> jnp.ndarray:
    """Identity that makes a product round to f32 before the add that follows it.

    XLA's CPU backend contracts ``a * b + c`` into one FMA (a single rounding) even
    without fast-math, and optimization barriers do not survive to code generation;
    bnb rounds the product first. A select on the product's own NaN test keeps the
    multiply and the add apart and changes no value.
    """
    return jnp.where(product != product, jnp.float32(jnp.nan), product)


def num_blocks(numel: int, blocksize: int) -> int:
    """How many blocks of ``blocksize`` cover ``numel`` elements (the last may be partial)."""
    return -(-numel // blocksize)


def _block_absmax(x: jnp.ndarray, blocksize: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``x: f32[n]`` -> (full blocks ``f32[n // b, b]``, their absmax ``f32[n // b]``)."""
    full = (x.shape[0] // blocksize) * blocksize
    blocks = x[:full].reshape(-1, blocksize)
    return blocks, jnp.max(jnp.abs(blocks), axis=-1, initial=0.0)


def quantize_4bit_codes(x: jnp.ndarray, blocksize: int, quant_type: str) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Round ``x: f32[n]`` to 4-bit codes, bnb's CPU quantize_4bit.

    Returns (``codes: u8[n + n % 2]`` in 0..15, ``absmax: f32[N]``); an odd ``n``
    gets one extra code for the value 0.0, as bnb pads. Full blocks are scaled
    by the reciprocal of their absmax (clamped to 1e-38), the partial last block by
    division; the stored absmax of a partial block is the clamped one, as bnb does.
    A block holding NaN or Inf gets a NaN absmax so it can never decode to finite
    values.
    """
    n = x.shape[0]
    bounds, order = rounding_bounds(quant_type)
    blocks, absmax = _block_absmax(x, blocksize)
    # XLA on CPU flushes subnormals to zero, so bnb's clamp of absmax to 1e-38 would
    # turn into a division by zero: an all-zero block is scaled by 0 instead (same codes).
    reciprocal = jnp.where(absmax > 0, jnp.float32(1.0) / absmax, jnp.float32(0.0))
    scaled = jnp.clip(blocks * reciprocal[:, None], -1.0, 1.0).reshape(-1)
    finite = jnp.all(jnp.isfinite(blocks), axis=-1)
    absmax = jnp.where(finite, absmax, jnp.nan)
    if n % blocksize:
        rest = x[blocks.size :]
        rest_absmax = jnp.max(jnp.abs(rest))
        rest_scaled = jnp.where(rest_absmax > 0, rest / rest_absmax, jnp.float32(0.0))
        scaled = jnp.concatenate([scaled, jnp.clip(rest_scaled, -1.0, 1.0)])
        # bnb stores the clamped absmax (1e-38) for an all-zero partial block; set its bits directly.
        rest_bits = jnp.where(rest_absmax > 0, lax.bitcast_convert_type(rest_absmax, jnp.int32), _TINY_BITS)
        rest_absmax = jnp.where(jnp.all(jnp.isfinite(rest)), lax.bitcast_convert_type(rest_bits, jnp.float32), jnp.nan)
        absmax = jnp.concatenate([absmax, rest_absmax[None]])
    if n % 2:  # bnb pads the scaled values with one 0.0 so that codes pack into whole bytes
        scaled = jnp.concatenate([scaled, jnp.zeros((1,), scaled.dtype)])
    rank = jnp.sum(scaled[:, None] > jnp.asarray(bounds)[None, :], axis=-1)
    codes = jnp.asarray(order, jnp.uint8)[rank]
    return codes, absmax


def scale_blocks(values: jnp.ndarray, absmax: jnp.ndarray, blocksize: int) -> jnp.ndarray:
    """``values: f32[n]`` times the absmax of each one's block, ``-> f32[N * blocksize]`` (zero-padded past n).

    Through a ``[N, blocksize]`` view with ``absmax[:, None]`` broadcast, not an absmax repeated
    per element: XLA's CPU backend runs the repeat as a slow gather, 10-25x slower than the
    whole dequantization otherwise is (``scripts/bench_dequant.py``).
    """
    blocks = jnp.pad(values, (0, absmax.shape[0] * blocksize - values.shape[0])).reshape(absmax.shape[0], blocksize)
    return (blocks * absmax[:, None]).reshape(-1)


def pack_nibbles(codes: jnp.ndarray) -> jnp.ndarray:
    """``codes: u8[2m]`` -> ``u8[m]``, element 2i in the high nibble and 2i + 1 in the low nibble (bnb order)."""
    if codes.shape[0] % 2:
        raise ValueError(f"pack_nibbles needs an even number of codes, got {codes.shape[0]}")
    pairs = codes.reshape(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


_NIBBLE_SHIFTS = (4, 0)  # element 2i sits in a byte's high nibble, element 2i + 1 in its low nibble


def unpack_nibbles(packed: jnp.ndarray, numel: int) -> jnp.ndarray:
    """``packed: u8[ceil(numel / 2)]`` -> ``codes: u8[numel]`` (inverse of ``pack_nibbles``)."""
    codes = (packed[:, None] >> jnp.asarray(_NIBBLE_SHIFTS, jnp.uint8)) & 0xF
    return codes.reshape(-1)[:numel]


def decode_blocks(packed: jnp.ndarray, absmax: jnp.ndarray, quant_type: str, dtype) -> jnp.ndarray:
    """Whole blocks of 4-bit codes to values: ``packed: u8[N, b/2]`` (one row per block), ``absmax: f32[N]``
    -> ``dtype[N, b]``, ``table[code] * absmax`` in f32, then cast (bitsandbytes' ``dequantize_4bit``).
    Lookups use ``mode="clip"``: every code is in range, so the gather needs no out-of-bounds fill.
    This is the XLA path (TPU, GPU, and the CPU without a compiler); on x86-64 CPUs the C++ kernel
    of ``cpu_kernel`` produces the same bits faster.

    Formulated for XLA's CPU backend, where the obvious form (decode the high and the low nibbles,
    then interleave them with stack + reshape) runs 2-3x slower than the lookups themselves
    (``scripts/bench_dequant.py``): a 32-bit output computes each element's own nibble over an
    ``[N, b/2, 2]`` view (shift 4 or 0), a loop XLA vectorizes; a 16-bit output decodes both
    halves, casts them, and packs each pair into one ``u32`` word that is bitcast back (XLA's
    f32 -> bf16 conversion only vectorizes over contiguous halves; every JAX backend is
    little-endian, so the low half is the element that comes first). The price of the 16-bit
    form: XLA's CPU backend keeps the two halves (together the output's size) until the words
    are written; at LLaMA-7B's compiled step that did not move the peak.
    """
    table = jnp.asarray(codebook(quant_type))
    scale = absmax[:, None]
    if jnp.dtype(dtype).itemsize == 2:
        high, low = ((jnp.take(table, (packed >> shift & 0xF).astype(jnp.int32), mode="clip") * scale).astype(dtype)
                     for shift in _NIBBLE_SHIFTS)
        word = (lax.bitcast_convert_type(high, jnp.uint16).astype(jnp.uint32)
                | lax.bitcast_convert_type(low, jnp.uint16).astype(jnp.uint32) << 16)
        return lax.bitcast_convert_type(word, dtype).reshape(packed.shape[0], -1)
    codes = packed.astype(jnp.int32)[:, :, None] >> jnp.asarray(_NIBBLE_SHIFTS, jnp.int32) & 0xF  # [N, b/2, 2]
    values = jnp.take(table, codes, mode="clip") * scale[:, :, None]
    return values.reshape(packed.shape[0], -1).astype(dtype)


def _lut_index(normed: jnp.ndarray) -> jnp.ndarray:
    """The lookup-table slot of ``normed: f32[...]`` in [-1, 1]: ``floor((x + 1) * 32767.5 + 0.5)``; NaN -> 0."""
    slot = jnp.floor(rounded((normed + jnp.float32(1.0)) * jnp.float32(_LUT_SCALE)) + jnp.float32(0.5))
    slot = jnp.where(jnp.isnan(normed), 0, slot)
    return jnp.clip(slot, 0, _LUT_SIZE - 1).astype(jnp.int32)


def double_quantize(absmax: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """bnb ``compress_statistics=True``: quantize ``absmax: f32[N]`` to 8 bits.

    Subtracts ``offset = mean(absmax)`` (torch's CPU summation order), then
    quantizes blockwise (blocksize 256): ``x / nested_absmax`` is rounded to a
    code of the signed dynamic map through bnb's 65536-slot lookup table (see
    ``dynamic_map_lut``). Returns (``codes: u8[N]``,
    ``nested_absmax: f32[ceil(N / 256)]``, ``offset: f32[]``).
    """
    n = absmax.shape[0]
    offset = torch_cpu_mean(absmax)
    centered = absmax - offset
    padded_len = num_blocks(n, NESTED_BLOCKSIZE) * NESTED_BLOCKSIZE
    blocks = jnp.pad(centered, (0, padded_len - n)).reshape(-1, NESTED_BLOCKSIZE)
    nested_absmax = jnp.max(jnp.abs(blocks), axis=-1)
    normed = (blocks / nested_absmax[:, None]).reshape(-1)[:n]
    codes = jnp.asarray(dynamic_map_lut())[_lut_index(normed)]
    return codes, nested_absmax, offset


def double_dequantize(codes: jnp.ndarray, nested_absmax: jnp.ndarray, offset: jnp.ndarray) -> jnp.ndarray:
    """Inverse of ``double_quantize``: ``map[code] * nested_absmax[block]``, then ``+ offset``, in f32 -> ``f32[N]``."""
    n = codes.shape[0]
    values = jnp.take(jnp.asarray(dynamic_map_signed()), codes.astype(jnp.int32), mode="clip")
    return rounded(scale_blocks(values, nested_absmax, NESTED_BLOCKSIZE)[:n]) + offset
