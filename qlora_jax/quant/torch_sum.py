"""The float32 mean that bitsandbytes' double quantization takes, reproduced bit for bit.

bnb's offset is ``absmax.mean()`` in torch on the CPU. torch does not sum left to
right: its cascade sum (aten/src/ATen/native/cpu/SumKernel.cpp) loads 8-lane
float vectors, sums 4 of them side by side ("ilp"), and folds chunks of 16 or
more rows through 4 levels of accumulators so that only sums of similar size
meet. A different order changes the last bit of the offset, and that bit can
change the 8-bit codes of the absmax values. We replay the same order with
sequential f32 adds (``lax.scan``), which XLA never reassociates.

Scope: torch splits sums of more than 32768 elements over its threads, and the
split depends on ``torch.get_num_threads()``; we replay the one-thread order,
so for tensors with more than 32768 quantization blocks the offset matches bnb
run with one torch thread.
"""

import jax.numpy as jnp
from jax import lax

_LANES = 8  # float lanes of torch's Vectorized<float> on x86 CPUs (AVX2 kernels)
_ILP = 4  # rows summed side by side in row_sum
_LEVELS = 4  # accumulator levels in multi_row_sum


def _fold(rows: jnp.ndarray) -> jnp.ndarray:
    """Left-to-right sum of ``rows: f32[k, W]`` from a zero accumulator -> ``f32[W]``."""
    zero = jnp.zeros(rows.shape[1:], rows.dtype)
    if rows.shape[0] == 0:
        return zero
    return lax.scan(lambda acc, row: (acc + row, None), zero, rows)[0]


def _fold_groups(items: jnp.ndarray, group: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Fold full groups of ``group`` rows each, and the partial group left over.

    ``items: f32[k, W]`` -> (``f32[k // group, W]`` group sums, ``f32[W]`` remainder sum).
    """
    full = items.shape[0] // group
    grouped = items[: full * group].reshape(full, group, items.shape[1]).transpose(1, 0, 2)
    return _fold(grouped), _fold(items[full * group :])


def _multi_row_sum(rows: jnp.ndarray) -> jnp.ndarray:
    """torch's multi_row_sum: ``rows: f32[size, W]`` -> ``f32[W]`` through 4 accumulator levels."""
    size = rows.shape[0]
    ceil_log2 = 1 if size <= 2 else (size - 1).bit_length()
    step = 1 << max(4, ceil_log2 // _LEVELS)
    chunks, tail = _fold_groups(rows, step)  # level 0: full chunks of `step` rows
    level1, acc1 = _fold_groups(chunks, step)
    level2, acc2 = _fold_groups(level1, step)
    acc3 = _fold(level2)
    return ((tail + acc1) + acc2) + acc3


def _row_sum(items: jnp.ndarray) -> jnp.ndarray:
    """torch's row_sum: ``items: f32[k, L]`` loads -> ``f32[L]``, 4 loads side by side."""
    k, lanes = items.shape
    rows = k // _ILP
    partial = _multi_row_sum(items[: rows * _ILP].reshape(rows, _ILP * lanes)).reshape(_ILP, lanes)
    first = partial[0]
    for i in range(rows * _ILP, k):
        first = first + items[i]
    for j in range(1, _ILP):
        first = first + partial[j]
    return first


def torch_cpu_sum(x: jnp.ndarray) -> jnp.ndarray:
    """``torch.sum`` of a contiguous ``f32[n]`` on one CPU thread, bit for bit -> ``f32[]``."""
    n = x.shape[0]
    if n < _LANES:
        return jnp.float32(0) + _row_sum(x.reshape(n, 1))[0]
    vectors = n // _LANES
    lane_sums = _row_sum(x[: vectors * _LANES].reshape(vectors, _LANES))
    total = jnp.float32(0)
    for i in range(vectors * _LANES, n):
        total = total + x[i]
    for lane in range(_LANES):
        total = total + lane_sums[lane]
    return total


def torch_cpu_mean(x: jnp.ndarray) -> jnp.ndarray:
    """``torch.mean`` of a contiguous ``f32[n]`` on the CPU: the cascade sum divided by n."""
    # The barrier keeps XLA from turning the division by a constant into an inexact
    # multiplication by 1/n.
    return torch_cpu_sum(x) / lax.optimization_barrier(jnp.float32(x.shape[0]))
