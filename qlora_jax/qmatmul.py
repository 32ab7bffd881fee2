"""``y = x @ dequant(W).T`` for a frozen 4-bit weight, with a gradient for ``x`` only.

The weight never gets a gradient, and the dequantized weight is not kept as a
residual for the backward pass: the backward pass computes ``dx = dy @ dequant(W)``
from the packed weight again. Two implementations of both products:

- ``xla``: dequantize the whole weight to the compute dtype, then one dot
  (``pallas_kernels.nf4_matmul_reference``; the test oracle). For a weight above ``TILE_ELEMENTS``
  both products instead dequantize up to ``ROW_TILE`` output rows at a time and multiply each
  tile while it is still in cache (``_tiled_forward``, ``_tiled_backward``, where ``tile_rows``
  allows): the decoded weight never exists whole, so a training step holds one tile per
  product instead of a layer's decoded weights (``python -m qlora_jax.memory --compiled``),
  and a matrix-vector product reads the weight once instead of writing and re-reading it.
- ``pallas``: the fused kernels of ``pallas_kernels.nf4_matmul``, which read the
  packed codes and dequantize tiles in registers. Compiled through Triton on GPU;
  on CPU they run in Pallas' interpreter (tests only: slow).

``auto`` is ``xla`` off a GPU. On a GPU it picks per product (``gpu``): the fused kernels where
the XLA path would loop over row tiles (few rows of ``x`` against a large weight: decoding,
short prompts, short micro-batches; ``tile_rows``), since a GPU runs each tile as its own small
kernels, and XLA's whole-weight dequantize + one dot elsewhere. On an H200 (jax 0.11.2,
``benchmarks/results/gpu_h200/``) the kernels decoded 4-5x more tokens/s than the tiled XLA
path at batch 1 and 8, and XLA's whole-weight products trained a TinyLlama-1.1B-shaped model
(8 x 512 tokens) 4x faster than the kernels. Weights the kernels do not take
(``pallas_kernels.supports``) use ``xla``.

Under a device mesh (``qlora_jax.parallel.use``), both products run per device in a
``shard_map``: each device gathers the weight's fsdp shards as stored (``u8`` codes)
and multiplies its own rows of ``x``/``dy``. The backward pass gathers again instead of
keeping the gathered weight; with the decoder layers in a ``lax.scan`` (stored stacked)
the two gathers sit in different loops, so one layer's full weight exists at a time.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import nf4_matmul, nf4_matmul_reference, nf4_matmul_t, nf4_matmul_t_reference, supports

from . import parallel
from .quant import QuantizedTensor, cpu_kernel

KERNELS = ("auto", "pallas", "xla")


def implementation(kernel: str, platform: str) -> str:
    """``auto``/``pallas``/``xla`` -> what runs on ``platform`` for weights the kernels take: ``xla``,
    ``pallas``, ``interpret`` (Pallas off a GPU) or ``gpu`` (``auto`` on a GPU: per product, see above).
    The memory formula uses the same rule (``memory.for_platform``)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} must be one of {KERNELS}")
    if kernel == "xla" or (kernel == "auto" and platform != "gpu"):
        return "xla"
    if kernel == "auto":
        return "gpu"
    return "pallas" if platform == "gpu" else "interpret"


def resolve_kernel(kernel: str, weight: QuantizedTensor, platform: str | None = None) -> str:
    """``implementation`` on ``platform`` (default: here), ``xla`` for a weight the kernels do not take."""
    chosen = implementation(kernel, platform or jax.default_backend())
    return chosen if supports(weight) else "xla"


def quantized_matmul(x: jax.Array, weight: QuantizedTensor, compute_dtype, kernel: str = "auto") -> jax.Array:
    """``x: [..., in]`` times a ``[out, in]`` quantized weight -> ``[..., out]`` in ``compute_dtype``."""
    return _matmul_for(jnp.dtype(compute_dtype).name, resolve_kernel(kernel, weight))(x, weight)


ROW_TILE = 256  # most output rows dequantized at once: 256 x 4096 f32 (4 MiB) still sits in a CPU's L2/L3
TILE_ELEMENTS = ROW_TILE * 4096  # a weight this small decodes whole: one dot beats a loop of tiles


def tile_rows(n: int, k: int, blocksize: int, m: int, itemsize: int) -> int | None:
    """Rows per tile for the XLA products of an ``[n, k]`` weight with ``m`` rows of ``x``/``dy`` in a compute dtype
    of ``itemsize`` bytes: the largest divisor of n up to ``ROW_TILE`` whose tiles hold whole quant blocks (a
    multiple of 8 rows). None where the whole weight is decoded instead:

    - the weight has at most ``TILE_ELEMENTS`` elements: decoding SmolLM2's weights whole, then one dot,
      decodes 1.3-1.5x more tokens/s (``scripts/bench_decode.py``);
    - the tiled backward product's f32 ``[m, k]`` sum would be more than a quarter of the decoded
      weight (``16 m > itemsize n``: long micro-batches): the memory saved is small, and XLA's CPU
      backend runs one big dot faster than that many tiles (``scripts/bench_products.py``);
    - no such divisor, or one tile would be the whole weight.
    """
    if n * k <= TILE_ELEMENTS or 16 * m > itemsize * n:
        return None
    return next((r for r in range(min(ROW_TILE, n // 2), 7, -1)
                 if n % r == 0 and r % 8 == 0 and (r * k) % blocksize == 0), None)


def _rows_per_tile(a: jax.Array, weight: QuantizedTensor) -> int | None:
    """``tile_rows`` for the product of ``a: [M, width]`` with ``weight``."""
    return tile_rows(*weight.shape, weight.blocksize, a.shape[0], a.dtype.itemsize)


def _tile_decoder(weight: QuantizedTensor, rows: int, dtype):
    """The weight's codes and absmax as ``[tiles, ...]`` and a function decoding one tile to ``[rows, K]``."""
    n, k = weight.shape
    packed = weight.packed.reshape(n // rows, rows * k // 2)  # [tiles, rows * K / 2]
    absmax = weight.absmax_f32().reshape(n // rows, rows * k // weight.blocksize)  # decoded once for all tiles

    def decode(tile_packed, tile_absmax):
        blocks = tile_packed.reshape(-1, weight.blocksize // 2)
        return cpu_kernel.decode_blocks(blocks, tile_absmax, weight.quant_type, dtype).reshape(rows, k)

    return packed, absmax, decode


def _tiled_forward(x: jax.Array, weight: QuantizedTensor, rows: int) -> jax.Array:
    """``x: [M, K] @ dequant(weight).T -> [M, N]``, dequantizing ``rows`` rows of the weight per step."""
    packed, absmax, decode = _tile_decoder(weight, rows, x.dtype)

    def tile(args):
        return jnp.einsum("mk,nk->mn", x, decode(*args), preferred_element_type=jnp.float32).astype(x.dtype)

    out = jax.lax.map(tile, (packed, absmax))  # [tiles, M, rows]
    return out.transpose(1, 0, 2).reshape(x.shape[0], weight.shape[0])


def _tiled_backward(dy: jax.Array, weight: QuantizedTensor, rows: int) -> jax.Array:
    """``dy: [M, N] @ dequant(weight) -> [M, K]``, ``rows`` rows of the weight per step, summed in f32."""
    n, k = weight.shape
    packed, absmax, decode = _tile_decoder(weight, rows, dy.dtype)
    dy_tiles = dy.reshape(dy.shape[0], n // rows, rows).transpose(1, 0, 2)  # [tiles, M, rows]

    def tile(total, args):
        tile_packed, tile_absmax, tile_dy = args
        return total + jnp.einsum("mn,nk->mk", tile_dy, decode(tile_packed, tile_absmax),
                                  preferred_element_type=jnp.float32), None

    total, _ = jax.lax.scan(tile, jnp.zeros((dy.shape[0], k), jnp.float32), (packed, absmax, dy_tiles))
    return total.astype(dy.dtype)


def _tiled_or_whole(tiled, whole):
    """A product of ``a: [M, width]`` with a weight: ``tiled(a, weight, rows)`` where ``tile_rows`` tiles it,
    else ``whole(a, weight)``."""
    def product(a: jax.Array, weight: QuantizedTensor) -> jax.Array:
        rows = _rows_per_tile(a, weight)
        return whole(a, weight) if rows is None else tiled(a, weight, rows)

    return product


def _untiled(kernel):
    """``kernel(a, weight)`` in ``tiled``'s place: the fused kernels decode in registers, no tiles needed."""
    return lambda a, weight, _rows: kernel(a, weight)


_xla_forward = _tiled_or_whole(_tiled_forward, nf4_matmul_reference)
_xla_backward = _tiled_or_whole(_tiled_backward, nf4_matmul_t_reference)
_FORWARD = {"xla": _xla_forward, "pallas": nf4_matmul,
            "gpu": _tiled_or_whole(_untiled(nf4_matmul), nf4_matmul_reference),
            "interpret": functools.partial(nf4_matmul, interpret=True)}
_BACKWARD = {"xla": _xla_backward, "pallas": nf4_matmul_t,
             "gpu": _tiled_or_whole(_untiled(nf4_matmul_t), nf4_matmul_t_reference),
             "interpret": functools.partial(nf4_matmul_t, interpret=True)}


def _rows(fn, a: jax.Array, weight: QuantizedTensor) -> jax.Array:
    """Apply a 2-D product ``fn`` to ``a: [..., width]`` by flattening the leading dimensions."""
    out = fn(a.reshape(-1, a.shape[-1]), weight)
    return out.reshape(*a.shape[:-1], out.shape[-1])


def _weight_specs(weight: QuantizedTensor, mesh) -> QuantizedTensor:
    """Partition specs of the weight's leaves (``parallel.frozen_spec``), shaped like the weight."""
    def spec(name):
        leaf = getattr(weight, name)
        return None if leaf is None else parallel.frozen_spec(name, leaf.shape, mesh.shape[parallel.FSDP])

    return QuantizedTensor(spec("packed"), spec("absmax"), spec("nested_absmax"), spec("offset"), weight.shape,
                           weight.dtype, weight.blocksize, weight.quant_type)


def _product(fn, a: jax.Array, weight: QuantizedTensor) -> jax.Array:
    """``_rows(fn, a, weight)``; under a mesh, per device on its rows of ``a: [B, ..., width]``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _rows(fn, a, weight)
    a_spec, weight_specs = parallel.batch_spec(a.shape[0], mesh), _weight_specs(weight, mesh)

    split = [name for name in ("packed", "absmax") if getattr(weight_specs, name) != P()]

    def local(a, weight):
        gathered = {name: jax.lax.all_gather(getattr(weight, name), parallel.FSDP, tiled=True) for name in split}
        return _rows(fn, a, dataclasses.replace(weight, **gathered))

    return jax.shard_map(local, mesh=mesh, in_specs=(a_spec, weight_specs), out_specs=a_spec,
                         check_vma=False)(a, weight)


@functools.cache
def _matmul_for(dtype_name: str, implementation: str):
    compute_dtype = jnp.dtype(dtype_name)

    def forward(x, weight):
        return _product(_FORWARD[implementation], x.astype(compute_dtype), weight)

    def forward_with_residuals(x, weight):
        return forward(x, weight), (weight, x[..., :0])  # x[..., :0] carries x's dtype, no data

    def backward(residuals, dy):
        weight, x_like = residuals
        dx = _product(_BACKWARD[implementation], dy.astype(compute_dtype), weight)
        return dx.astype(x_like.dtype), None

    matmul = jax.custom_vjp(forward)
    matmul.defvjp(forward_with_residuals, backward)
    return matmul
