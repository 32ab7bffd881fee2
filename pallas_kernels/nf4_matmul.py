"""Fused 4-bit dequantize-matmul kernels (Pallas, Triton lowering): the weight is read packed.

Maths: ``y = x @ dequant(W).T`` (``nf4_matmul``: forward, and decoding for M = 1..16
through split-K) and ``dx = dy @ dequant(W)`` (``nf4_matmul_t``: the input gradient),
with ``dequant(W)[n, k] = table[code[n, k]] * absmax[n, k // blocksize]`` in f32
(format: ``qlora_jax.quant``), cast to the activation dtype, and f32 accumulation.

Layouts: ``x: [M, K]``, ``dy: [M, N]``, ``W: [N, K]`` in bitsandbytes' own packing,
viewed as ``packed: u8[N, K / 2]`` (byte j of a row holds element 2j in the high
nibble and 2j + 1 in the low one) and ``absmax: f32[N, K / blocksize]``. The kernels
need no other layout: the high nibbles multiply the even columns of ``x`` and the low
nibbles the odd ones (stride-2 loads), and ``nf4_matmul_t`` stores even and odd
columns of ``dx`` with stride-2 stores. So bnb checkpoints, our quantizer and the
kernels share one array, and nothing is converted at load time. Double-quantized
absmax codes are decoded once per call in XLA (``N * K / blocksize`` values), and the
16-entry table lookup is a tree of 15 selects (Triton has no gather).

Hardware: CUDA GPUs that Triton supports (Ampere A100/A6000, Hopper H100/H200),
through ``jax.experimental.pallas.triton.CompilerParams``, which selects the Triton
lowering explicitly (Mosaic GPU, jax's default GPU lowering, is Hopper-only). On CPU
the kernels run only with ``interpret=True`` (tests); ``qlora_jax.qmatmul`` uses the
``*_reference`` twins on CPU and TPU.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qlora_jax.quant import QuantizedTensor, codebook, dequantize

_ACTIVATION_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_MIN_DOT = 16  # Triton's tl.dot needs every dimension >= 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton launch settings of one kernel call.

    ``block_m`` rows of x, ``block_n`` rows of W, ``block_k`` elements of K per inner
    step (at most one quantization block), ``splits`` K-ranges reduced in XLA (split-K,
    for decoding), and Triton's ``num_warps`` / ``num_stages``.
    """

    block_m: int
    block_n: int
    block_k: int
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 3

    @staticmethod
    def default(m: int) -> "BlockSizes":
        """The tuned entry of ``TUNED`` for a call with ``m`` rows of activations."""
        for max_m, sizes in TUNED:
            if m <= max_m:
                return sizes
        return TUNED[-1][1]


# Shape classes by M (rows of activations): decode, small batch, training. Retune with
# ``python scripts/bench_kernels.py --sweep`` on the target GPU and copy the winners here.
TUNED: tuple[tuple[int, BlockSizes], ...] = (
    (16, BlockSizes(block_m=16, block_n=64, block_k=64, splits=4, num_warps=4, num_stages=3)),
    (128, BlockSizes(block_m=64, block_n=64, block_k=64, splits=1, num_warps=4, num_stages=3)),
    (1 << 62, BlockSizes(block_m=128, block_n=128, block_k=64, splits=1, num_warps=8, num_stages=3)),
)


def _decode(codes: jax.Array, table: tuple[float, ...]) -> jax.Array:
    """``i32`` codes in [0, 16) -> ``f32`` table values, as a binary tree of selects on the code bits."""
    level = [jnp.float32(v) for v in table]
    for bit in range(4):
        is_set = ((codes >> bit) & 1) == 1
        level = [jnp.where(is_set, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def _dequant_halves(packed: jax.Array, scale: jax.Array, table, dtype) -> tuple[jax.Array, jax.Array]:
    """``packed: u8[n, k/2]``, ``scale: f32[n, 1]`` -> (even columns, odd columns), each ``dtype[n, k/2]``."""
    codes = packed.astype(jnp.int32)
    high = (_decode(codes >> 4, table) * scale).astype(dtype)
    low = (_decode(codes & 15, table) * scale).astype(dtype)
    return high, low


def _matmul_kernel(x_ref, packed_ref, absmax_ref, o_ref, *, table, block_k, blocksize, steps):
    # x_ref: [block_m, K / splits]; packed_ref: u8[block_n, K / splits / 2]
    # absmax_ref: f32[block_n, K / splits / blocksize]; o_ref: [block_m, block_n] (one split)
    half = block_k // 2

    def step(i, acc):
        x_even = x_ref[:, pl.ds(i * block_k, half, stride=2)]  # [block_m, half]
        x_odd = x_ref[:, pl.ds(i * block_k + 1, half, stride=2)]  # [block_m, half]
        scale = absmax_ref[:, pl.ds((i * block_k) // blocksize, 1)]  # [block_n, 1]
        high, low = _dequant_halves(packed_ref[:, pl.ds(i * half, half)], scale, table, x_even.dtype)
        acc += jnp.dot(x_even, high.T, preferred_element_type=jnp.float32)
        return acc + jnp.dot(x_odd, low.T, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros(o_ref.shape[-2:], jnp.float32))
    o_ref[...] = acc.reshape(o_ref.shape).astype(o_ref.dtype)


def _matmul_t_kernel(dy_ref, packed_ref, absmax_ref, o_ref, *, table, block_n, steps):
    # dy_ref: [block_m, N]; packed_ref: u8[N, block_k / 2]; absmax_ref: f32[N, 1]
    # o_ref: [block_m, block_k]
    half = packed_ref.shape[1]

    def step(i, accs):
        rows = pl.ds(i * block_n, block_n)
        dy = dy_ref[:, rows]  # [block_m, block_n]
        high, low = _dequant_halves(packed_ref[rows, :], absmax_ref[rows, :], table, dy.dtype)  # [block_n, half]
        return (accs[0] + jnp.dot(dy, high, preferred_element_type=jnp.float32),
                accs[1] + jnp.dot(dy, low, preferred_element_type=jnp.float32))

    zeros = jnp.zeros((o_ref.shape[0], half), jnp.float32)
    acc_even, acc_odd = jax.lax.fori_loop(0, steps, step, (zeros, zeros))
    o_ref[:, pl.ds(0, half, stride=2)] = acc_even.astype(o_ref.dtype)
    o_ref[:, pl.ds(1, half, stride=2)] = acc_odd.astype(o_ref.dtype)


def _largest_pow2_divisor(n: int, at_most: int) -> int:
    block = at_most
    while block > _MIN_DOT and n % block:
        block //= 2
    return block


def _check_weight(weight: QuantizedTensor, block_k: int) -> tuple[int, int]:
    if len(weight.shape) != 2:
        raise ValueError(f"the 4-bit weight must be [N, K], got shape {weight.shape}")
    n, k = weight.shape
    if n % _MIN_DOT:
        raise ValueError(f"N={n} rows of the weight must be a multiple of {_MIN_DOT}")
    if k % weight.blocksize:
        raise ValueError(f"K={k} must be a multiple of blocksize={weight.blocksize} (one absmax row per weight row)")
    if block_k > weight.blocksize or weight.blocksize % block_k or block_k < 2 * _MIN_DOT:
        raise ValueError(f"block_k={block_k} must divide blocksize={weight.blocksize} and be >= {2 * _MIN_DOT}")
    return n, k


def _check_activations(a: jax.Array, name: str, width: int) -> None:
    if a.ndim != 2 or a.shape[1] != width:
        raise ValueError(f"{name} must be [M, {width}], got shape {a.shape}")
    if not any(a.dtype == d for d in _ACTIVATION_DTYPES):
        raise TypeError(f"{name} must be bfloat16, float16 or float32, got {a.dtype}")


def supports(weight: QuantizedTensor) -> bool:
    """Whether the kernels take this weight (2-D, N a multiple of 16, K a multiple of the blocksize)."""
    return (len(weight.shape) == 2 and weight.shape[0] % _MIN_DOT == 0
            and weight.shape[1] % weight.blocksize == 0)


def _operands(weight: QuantizedTensor) -> tuple[jax.Array, jax.Array, tuple[float, ...]]:
    """``packed: u8[N, K/2]``, ``absmax: f32[N, K/blocksize]`` (double quant decoded here) and the table."""
    n, k = weight.shape
    packed = weight.packed.reshape(n, k // 2)
    absmax = weight.absmax_f32().reshape(n, k // weight.blocksize)
    return packed, absmax, tuple(float(v) for v in codebook(weight.quant_type))


def _pad_rows(a: jax.Array, block_m: int) -> jax.Array:
    return jnp.pad(a, ((0, -a.shape[0] % block_m), (0, 0)))


class _Plan(NamedTuple):
    sizes: BlockSizes
    block_k: int
    block_n: int
    n: int
    k: int
    padded: jax.Array  # activations, rows padded to a multiple of block_m
    packed: jax.Array  # u8[N, K / 2]
    absmax: jax.Array  # f32[N, K / blocksize]
    table: tuple[float, ...]


def _plan(a: jax.Array, name: str, weight: QuantizedTensor, block_sizes: BlockSizes | None,
          transposed: bool) -> _Plan:
    """Check the operands of either kernel and choose its tiles."""
    sizes = block_sizes or BlockSizes.default(a.shape[0])
    block_k = min(sizes.block_k, weight.blocksize)
    n, k = _check_weight(weight, block_k)
    _check_activations(a, name, n if transposed else k)
    packed, absmax, table = _operands(weight)
    return _Plan(sizes, block_k, _largest_pow2_divisor(n, sizes.block_n), n, k, _pad_rows(a, sizes.block_m),
                 packed, absmax, table)


def _compiler_params(sizes: BlockSizes) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=sizes.num_warps, num_stages=sizes.num_stages)


def nf4_matmul(x: jax.Array, weight: QuantizedTensor, *, block_sizes: BlockSizes | None = None,
               interpret: bool = False) -> jax.Array:
    """``x: [M, K]`` (bf16/f16/f32) times a 4-bit ``[N, K]`` weight, transposed -> ``[M, N]`` in ``x.dtype``."""
    plan = _plan(x, "x", weight, block_sizes, transposed=False)
    sizes, block_n, n, k = plan.sizes, plan.block_n, plan.n, plan.k
    blocks_per_row = k // weight.blocksize
    splits = max(s for s in range(1, sizes.splits + 1) if blocks_per_row % s == 0)
    k_split = k // splits
    x_padded = plan.padded
    kernel = functools.partial(_matmul_kernel, table=plan.table, block_k=plan.block_k, blocksize=weight.blocksize,
                               steps=k_split // plan.block_k)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((splits, x_padded.shape[0], n), jnp.float32 if splits > 1 else x.dtype),
        grid=(x_padded.shape[0] // sizes.block_m, n // block_n, splits),
        in_specs=[
            pl.BlockSpec((sizes.block_m, k_split), lambda i, j, s: (i, s)),
            pl.BlockSpec((block_n, k_split // 2), lambda i, j, s: (j, s)),
            pl.BlockSpec((block_n, k_split // weight.blocksize), lambda i, j, s: (j, s)),
        ],
        out_specs=pl.BlockSpec((None, sizes.block_m, block_n), lambda i, j, s: (s, i, j)),
        compiler_params=_compiler_params(sizes),
        interpret=interpret,
        name="nf4_matmul",
    )(x_padded, plan.packed, plan.absmax)
    y = out[0] if splits == 1 else out.sum(axis=0).astype(x.dtype)
    return y[:x.shape[0]]


def nf4_matmul_t(dy: jax.Array, weight: QuantizedTensor, *, block_sizes: BlockSizes | None = None,
                 interpret: bool = False) -> jax.Array:
    """``dy: [M, N]`` (bf16/f16/f32) times a 4-bit ``[N, K]`` weight -> ``[M, K]`` in ``dy.dtype``."""
    plan = _plan(dy, "dy", weight, block_sizes, transposed=True)
    sizes, block_k, block_n, n, k = plan.sizes, plan.block_k, plan.block_n, plan.n, plan.k
    dy_padded = plan.padded
    kernel = functools.partial(_matmul_t_kernel, table=plan.table, block_n=block_n, steps=n // block_n)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((dy_padded.shape[0], k), dy.dtype),
        grid=(dy_padded.shape[0] // sizes.block_m, k // block_k),
        in_specs=[
            pl.BlockSpec((sizes.block_m, n), lambda i, j: (i, 0)),
            pl.BlockSpec((n, block_k // 2), lambda i, j: (0, j)),
            pl.BlockSpec((n, 1), lambda i, j: (0, (j * block_k) // weight.blocksize)),
        ],
        out_specs=pl.BlockSpec((sizes.block_m, block_k), lambda i, j: (i, j)),
        compiler_params=_compiler_params(sizes),
        interpret=interpret,
        name="nf4_matmul_t",
    )(dy_padded, plan.packed, plan.absmax)
    return out[:dy.shape[0]]


def nf4_matmul_reference(x: jax.Array, weight: QuantizedTensor) -> jax.Array:
    """XLA twin of ``nf4_matmul``: dequantize the whole weight to ``x.dtype``, then one dot."""
    w = dequantize(weight, x.dtype)  # [N, K]
    return jnp.einsum("mk,nk->mn", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def nf4_matmul_t_reference(dy: jax.Array, weight: QuantizedTensor) -> jax.Array:
    """XLA twin of ``nf4_matmul_t``: dequantize the whole weight to ``dy.dtype``, then one dot."""
    w = dequantize(weight, dy.dtype)  # [N, K]
    return jnp.einsum("mn,nk->mk", dy, w, preferred_element_type=jnp.float32).astype(dy.dtype)
