"""``y = x @ dequant(W).T`` for a frozen 4-bit weight, with a gradient for ``x`` only.

The weight never gets a gradient, and the dequantized weight is not kept as a
residual for the backward pass: the backward pass computes ``dx = dy @ dequant(W)``
from the packed weight again. Two implementations of both products:

- ``xla``: dequantize the whole weight to the compute dtype, then one dot
  (``pallas_kernels.nf4_matmul_reference``; the test oracle).
- ``pallas``: the fused kernels of ``pallas_kernels.nf4_matmul``, which read the
  packed codes and dequantize tiles in registers. Compiled through Triton on GPU;
  on CPU they run in Pallas' interpreter (tests only: slow).

``auto`` picks ``pallas`` on GPU and ``xla`` elsewhere. Weights the kernels do not take
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
from .quant import QuantizedTensor

KERNELS = ("auto", "pallas", "xla")


def resolve_kernel(kernel: str, weight: QuantizedTensor) -> str:
    """``auto``/``pallas``/``xla`` -> the implementation that runs here: ``xla``, ``pallas`` or ``interpret``."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} must be one of {KERNELS}")
    on_gpu = jax.default_backend() == "gpu"
    if kernel == "xla" or not supports(weight) or (kernel == "auto" and not on_gpu):
        return "xla"
    return "pallas" if on_gpu else "interpret"


def quantized_matmul(x: jax.Array, weight: QuantizedTensor, compute_dtype, kernel: str = "auto") -> jax.Array:
    """``x: [..., in]`` times a ``[out, in]`` quantized weight -> ``[..., out]`` in ``compute_dtype``."""
    return _matmul_for(jnp.dtype(compute_dtype).name, resolve_kernel(kernel, weight))(x, weight)


_FORWARD = {"xla": nf4_matmul_reference, "pallas": nf4_matmul,
            "interpret": functools.partial(nf4_matmul, interpret=True)}
_BACKWARD = {"xla": nf4_matmul_t_reference, "pallas": nf4_matmul_t,
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
