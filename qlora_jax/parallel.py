"""Many devices and hosts: a ``data x fsdp`` device mesh, where each array lives, and multi-host start-up.

Placement (``MeshConfig``; every device of every host is in the mesh):

- batches ``[A, B, T]``: B split over ``data x fsdp`` (every device trains on its own rows);
- the packed 4-bit codes ``u8[numel / 2]`` and the absmax (``u8[N]`` codes with double
  quantization, else ``f32[N]``) of every linear layer: split into ``fsdp`` contiguous
  ranges (whole rows of W when ``fsdp`` divides ``out``). The layer gathers them back
  *as stored bytes*, one layer at a time, inside ``qmatmul``'s ``shard_map``; XLA's own
  partitioner would gather the dequantized floats (4x the bytes of bf16, 8x of f32);
- the 2-D frozen tensors (embeddings, lm_head, unquantized base weights): rows split
  over ``fsdp``, gathered by XLA where used;
- nested_absmax and offset (1/2048 of the packed bytes), norms, biases: replicated;
- LoRA parameters (f32) and their gradients: replicated. Every layer needs its adapters whole
  on every device, in the forward and the backward pass; replicated, the gradient all-reduce
  is the only collective they cost;
- the AdamW moments (twice the LoRA bytes): split over all devices along their first axis
  (ZeRO stage 1). Only the update touches them, elementwise, so each device updates its own
  rows and XLA gathers the new parameters once per step.

A leaf whose first dimension the ``fsdp`` size does not divide stays replicated.
Mesh axes are ``AxisType.Auto`` and set explicitly (``jax.make_mesh`` now defaults to
``Explicit``, which types shardings into every operation): XLA places the activations,
and the one transfer whose form matters, the weight gather, is written by hand.
"""

import contextlib
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .config import MeshConfig

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)


def initialize_distributed(environ=os.environ) -> bool:
    """Join the other processes of a multi-host job; returns whether this is one.

    ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0) with ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``: an explicit cluster (any GPU hosts). ``QLORA_JAX_DISTRIBUTED=1``:
    let ``jax.distributed.initialize`` detect the cluster (Cloud TPU slices, SLURM, Open
    MPI, Kubernetes). Neither: one process. Must run before anything touches a device.
    """
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        counts = {}
        for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
            value = environ.get(name, "")
            if not value.isdigit():
                raise ValueError(f"JAX_COORDINATOR_ADDRESS is set, so {name} must be set to an integer "
                                 f"(got {value!r})")
            counts[name] = int(value)
        if counts["JAX_PROCESS_ID"] >= counts["JAX_NUM_PROCESSES"]:
            raise ValueError(f"JAX_PROCESS_ID={counts['JAX_PROCESS_ID']} must be below "
                             f"JAX_NUM_PROCESSES={counts['JAX_NUM_PROCESSES']}")
        jax.distributed.initialize(environ["JAX_COORDINATOR_ADDRESS"], counts["JAX_NUM_PROCESSES"],
                                   counts["JAX_PROCESS_ID"])
        return True
    if environ.get("QLORA_JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False


def make_mesh(config: MeshConfig) -> Mesh | None:
    """The ``(data, fsdp)`` mesh over all devices, or None for a single-device run (1 x 1, one process)."""
    devices = jax.device_count()
    if config.size == 1 and jax.process_count() == 1:
        return None
    if config.size != devices:
        raise ValueError(f"mesh: data={config.data} x fsdp={config.fsdp} = {config.size} devices, but this run has "
                         f"{devices} ({jax.process_count()} process(es)); set mesh.data x mesh.fsdp = {devices}")
    return jax.make_mesh((config.data, config.fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def use(mesh: Mesh | None):
    """Context in which ``qmatmul`` shards its products over ``mesh`` (nothing for None)."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; orbax coordinates checkpoints itself)."""
    return jax.process_index() == 0


def global_array(value, sharding: NamedSharding) -> jax.Array:
    """``value`` (the same on every process) as one array laid out by ``sharding``; each process
    puts only the shards its own devices hold."""
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def frozen_spec(name: str, shape: tuple[int, ...], fsdp: int) -> P:
    """Where a frozen leaf named ``name`` lives: packed codes, absmax and 2-D tensors split their
    rows over fsdp (when fsdp divides them); everything else is replicated."""
    splittable = name in ("packed", "absmax") or len(shape) == 2
    return P(FSDP) if splittable and shape and shape[0] % fsdp == 0 else P()


def _leaf_name(path) -> str:
    """The variable's attribute name (``packed``, ``embed_tokens``, ...) from an ``nnx.State`` path."""
    return next(str(entry.key) for entry in reversed(path) if isinstance(getattr(entry, "key", None), str))


def place_frozen(name: str, value, mesh: Mesh) -> jax.Array:
    """A frozen array named ``name`` on its shards (``frozen_spec``)."""
    return global_array(value, NamedSharding(mesh, frozen_spec(name, value.shape, mesh.shape[FSDP])))


def stacked_spec(spec: P) -> P:
    """The spec of a stacked decoder-layer array ``[L, ...]`` whose one layer is laid out as ``spec``: the layer
    axis is never split."""
    return P(None, *spec)


def shard_frozen(state, mesh: Mesh):
    """Every array of a frozen-weight state (an ``nnx.State``) on its shards; the stacked decoder layers'
    arrays (under ``layers``) split as one layer would, along their rows, never along the layer axis."""
    def place(path, leaf):
        name = _leaf_name(path)
        if any(getattr(entry, "key", None) == "layers" for entry in path):
            spec = stacked_spec(frozen_spec(name, leaf.shape[1:], mesh.shape[FSDP]))
            return global_array(leaf, NamedSharding(mesh, spec))
        return place_frozen(name, leaf, mesh)

    return jax.tree_util.tree_map_with_path(place, state)


def replicate(tree, mesh: Mesh):
    """Every array of ``tree`` replicated on all devices of ``mesh``."""
    return jax.tree.map(lambda leaf: global_array(leaf, NamedSharding(mesh, P())), tree)


def _over_all_devices(mesh) -> P:
    """First dimension split over data x fsdp, written as XLA writes it back (size-1 axes left out), so a
    step's outputs carry the very specs of its inputs and the next step reuses the compiled program."""
    axes = tuple(name for name in BATCH_AXES if mesh.shape[name] > 1)
    return P(axes if len(axes) > 1 else axes[0]) if axes else P()


def optimizer_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
    """Where an optimizer-state leaf lives: rows over every device when they divide evenly, else replicated."""
    return _over_all_devices(mesh) if shape and shape[0] % mesh.size == 0 else P()


def shard_optimizer_state(opt_state, mesh: Mesh):
    """The optimizer state (the same on every process) split as ``optimizer_spec`` says."""
    return jax.tree.map(lambda leaf: global_array(leaf, NamedSharding(mesh, optimizer_spec(leaf.shape, mesh))),
                        opt_state)


def batch_spec(rows: int, mesh) -> P:
    """Rows split over data x fsdp when they divide evenly, else replicated."""
    return _over_all_devices(mesh) if rows % (mesh.shape[DATA] * mesh.shape[FSDP]) == 0 else P()


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Micro-batches ``[A, B, T]`` (the same on every process) with B split over data x fsdp."""
    spec = batch_spec(next(iter(batch.values())).shape[1], mesh)
    sharding = NamedSharding(mesh, P(None, *spec))
    return {key: global_array(value, sharding) for key, value in batch.items()}
