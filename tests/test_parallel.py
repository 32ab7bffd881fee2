"""Meshes on 8 CPU devices (conftest): data x FSDP training equals one device, the weights travel as
packed bytes, checkpoints move between meshes, and two processes train as one."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import adapter_bytes, train_config
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qlora_jax import parallel
from qlora_jax.checkpoint import Checkpoints
from qlora_jax.config import LoraConfig, MeshConfig, ModelConfig, QuantConfig
from qlora_jax.config_io import dump_run_config
from qlora_jax.loading import load_model, random_model
from qlora_jax.lora import LoRAParam, QLoRALinear
from qlora_jax.model import rope_inv_freq
from qlora_jax.quant import cpu_kernel
from qlora_jax.train import train

MESHES = [(8, 1), (2, 4), (1, 8)]
RUN = {"train.batch_size": 8, "train.grad_accum": 1, "train.steps": 3, "train.save_every": 0, "train.eval_every": 0,
       "train.eval_batches": 1}


def _history(run_dir) -> dict[str, list[float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {key: [row[key] for row in rows if key in row] for key in ("loss", "eval_loss")}


def _adapter(run_dir) -> dict[str, np.ndarray]:
    return {name: np.frombuffer(raw, np.float32) for name, raw in adapter_bytes(run_dir).items()}


def _train(model_dir, data_file, run_dir, mesh: tuple[int, int], offload: str = "none"):
    settings = {**RUN, "mesh.data": mesh[0], "mesh.fsdp": mesh[1], "optimizer.offload": offload}
    return train(train_config(model_dir, data_file, run_dir, **settings), log=lambda *_: None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _train_on_two_processes(model_dir, data_file, run_dir) -> None:
    """The 2 x 4 mesh as two hosts of 4 devices each (gloo collectives on the CPU): the documented
    multi-host command, once per process; each process's output goes to ``process_<i>.log`` next to
    ``run_dir``. Keeps the step-2 checkpoint too, for the resume test."""
    config = train_config(model_dir, data_file, run_dir, **{**RUN, "mesh.data": 2, "mesh.fsdp": 4,
                                                            "train.save_every": 2})
    config_file = run_dir.parent / "run.yaml"
    dump_run_config(config, config_file)
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    environment = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}", "JAX_NUM_PROCESSES": "2",
                   "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
                   "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=4".strip()}
    processes = [subprocess.Popen([sys.executable, "-m", "qlora_jax.train", "--config", str(config_file)],
                                  env={**environment, "JAX_PROCESS_ID": str(index)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for index in range(2)]
    for index, process in enumerate(processes):
        (run_dir.parent / f"process_{index}.log").write_text(process.communicate(timeout=300)[0])
    assert [process.returncode for process in processes] == [0, 0], (run_dir.parent / "process_0.log").read_text()


@pytest.fixture(scope="module")
def mesh_runs(tiny_chat_model, chat_file, tmp_path_factory):
    """The same 3-step fine-tune on one device and on each mesh: ``{(data, fsdp): run_dir}``.
    2 x 4 runs as two processes; 1 x 8 keeps the optimizer state in host memory."""
    runs = {mesh: tmp_path_factory.mktemp("mesh") / f"run_{mesh[0]}x{mesh[1]}" for mesh in [(1, 1), *MESHES]}
    for mesh in [(1, 1), (8, 1), (1, 8)]:
        _train(tiny_chat_model, chat_file, runs[mesh], mesh, offload="host" if mesh == (1, 8) else "none")
    _train_on_two_processes(tiny_chat_model, chat_file, runs[(2, 4)])
    return runs


def _assert_same_training(run_dir, reference_dir):
    history, reference = _history(run_dir), _history(reference_dir)
    assert len(history["loss"]) == len(reference["loss"]) == RUN["train.steps"]
    np.testing.assert_allclose(history["loss"], reference["loss"], rtol=2e-6)
    np.testing.assert_allclose(history["eval_loss"], reference["eval_loss"], rtol=2e-6)
    adapter, reference_adapter = _adapter(run_dir), _adapter(reference_dir)
    assert adapter.keys() == reference_adapter.keys()
    for name, values in adapter.items():
        np.testing.assert_allclose(values, reference_adapter[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES, ids=[f"{d}x{f}" for d, f in MESHES])
def test_mesh_trains_to_the_same_losses_as_one_device(mesh_runs, mesh):
    history = _history(mesh_runs[mesh])
    assert history["loss"][-1] < history["loss"][0]  # it trains
    summary = json.loads((mesh_runs[mesh] / "summary.json").read_text())
    assert summary["train_step_compilations"] == 1  # the state comes back laid out as it went in
    _assert_same_training(mesh_runs[mesh], mesh_runs[(1, 1)])


@pytest.mark.slow
def test_checkpoint_saved_on_one_mesh_resumes_on_another(mesh_runs, tiny_chat_model, chat_file, tmp_path):
    source, run_dir = mesh_runs[(2, 4)], tmp_path / "resumed"
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("step_3", "adapter", "summary.json"))
    summary = _train(tiny_chat_model, chat_file, run_dir, (1, 8))
    assert summary["resumed_from"] == 2
    _assert_same_training(run_dir, source)


def test_checkpoint_restores_into_the_shardings_asked_for(tmp_path):
    mesh_a, mesh_b = parallel.make_mesh(MeshConfig(2, 4)), parallel.make_mesh(MeshConfig(8, 1))
    values = np.arange(64, dtype=np.float32).reshape(16, 4)
    state = {"split": parallel.global_array(values, NamedSharding(mesh_a, P(parallel.FSDP))),
             "replicated": parallel.replicate(values[:2], mesh_a)}
    checkpoints = Checkpoints(tmp_path, keep=1)
    checkpoints.save(1, state, {"step": 1})
    like = {"split": parallel.global_array(np.zeros_like(values), NamedSharding(mesh_b, P(parallel.BATCH_AXES))),
            "replicated": jax.device_put(np.zeros((2, 4), np.float32), jax.devices()[3])}
    restored, meta = checkpoints.restore(1, like)
    checkpoints.close()
    assert meta == {"step": 1}
    assert restored["split"].sharding == like["split"].sharding
    assert restored["split"].addressable_shards[0].data.shape == (2, 4)
    assert restored["replicated"].devices() == {jax.devices()[3]}
    np.testing.assert_array_equal(restored["split"], values)
    np.testing.assert_array_equal(restored["replicated"], values[:2])


def test_loading_puts_each_frozen_tensor_on_its_shards(tiny_chat_model):
    mesh = parallel.make_mesh(MeshConfig(2, 4))
    model = load_model(tiny_chat_model, quant="nf4", lora=LoraConfig(rank=4), compute_dtype=jnp.float32, mesh=mesh)
    reference = load_model(tiny_chat_model, quant="nf4", lora=LoraConfig(rank=4), compute_dtype=jnp.float32)
    q_proj = model.layers.self_attn.q_proj  # stacked: [L, ...], split along each layer's rows, never over L
    for leaf, spec, shard_shape in ((q_proj.packed, P(None, parallel.FSDP), (2, 64 * 64 // 2 // 4)),
                                    (q_proj.absmax, P(None, parallel.FSDP), (2, 64 * 64 // 64 // 4)),
                                    (model.embed_tokens, P(parallel.FSDP), (49152 // 4, 64))):
        array = leaf.get_value()
        assert array.sharding.spec == spec
        assert {shard.data.shape for shard in array.addressable_shards} == {shard_shape}
    for leaf in (q_proj.nested_absmax, q_proj.offset, model.norm.weight, model.layers.input_layernorm.weight):
        assert leaf.get_value().sharding.is_fully_replicated
    for ours, theirs in zip(jax.tree.leaves(nnx.state(model, nnx.Not(LoRAParam))),
                            jax.tree.leaves(nnx.state(reference, nnx.Not(LoRAParam))), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def _gathers(hlo: str) -> list[tuple[str, int]]:
    """``(element type, elements)`` of every all-gather in compiled HLO text."""
    found = re.findall(r"= (\w+)\[([\d,]*)\]\{[^}]*\} all-gather\(", hlo)
    return [(dtype, int(np.prod([int(d) for d in dims.split(",") if d]))) for dtype, dims in found]


def _sharded_tiny_model(layers: int):
    """A random NF4 llama (D=64) and a 2 x 4 mesh."""
    config = ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = random_model(config, QuantConfig(), LoraConfig(rank=4), compute_dtype=jnp.float32)
    return config, model, parallel.make_mesh(MeshConfig(2, 4))


def _split_for(module, mesh):
    """``module`` split for a step on ``mesh``: frozen weights on their shards, LoRA replicated."""
    graphdef, lora, frozen = nnx.split(module, LoRAParam, ...)
    return graphdef, parallel.replicate(lora, mesh), parallel.shard_frozen(frozen, mesh)


def test_a_layer_gathers_its_weights_as_packed_bytes_not_floats(monkeypatch):
    config, model, mesh = _sharded_tiny_model(layers=1)
    graphdef, lora, frozen = _split_for(model.layer(0), mesh)
    x = parallel.global_array(np.random.default_rng(0).normal(size=(8, 16, 64)).astype(np.float32),
                              NamedSharding(mesh, P(parallel.BATCH_AXES)))
    positions, mask = jnp.broadcast_to(jnp.arange(16), (8, 16)), jnp.ones((8, 16), bool)

    def loss(lora, frozen, x):
        layer = nnx.merge(graphdef, lora, frozen)
        return jnp.sum(layer(x, positions, mask, rope_inv_freq(config.rope, 16))[0] ** 2)

    step = jax.jit(jax.grad(loss, argnums=(0, 2)))  # forward + backward: LoRA grads and dx
    with parallel.use(mesh):
        ours = _gathers(step.lower(lora, frozen, x).compile().as_text())
    # no mesh context: XLA partitions, decoding through its own ops (GPU, TPU; here the C++ kernel, a custom
    # call, would make XLA gather its operands, the packed bytes, as well)
    monkeypatch.setattr(cpu_kernel, "load", lambda: False)
    xla_alone = _gathers(step.lower(lora, frozen, x).compile().as_text())
    linears = model.layer(0).self_attn, model.layer(0).mlp
    stored = sorted(leaf.size for module in linears for linear in vars(module).values() if hasattr(linear, "packed")
                    for leaf in (linear.packed.get_value(), linear.absmax.get_value()))
    itemsize = {"u8": 1, "s32": 4, "f32": 4, "bf16": 2}
    print(f"one layer, forward + backward on a 2 x 4 mesh: all-gathers of {sum(n for _, n in ours)} bytes "
          f"({len(ours)} x u8); XLA alone: {sum(n * itemsize[t] for t, n in xla_alone)} bytes "
          f"({', '.join(sorted({t for t, _ in xla_alone}))})")
    assert {dtype for dtype, _ in ours} == {"u8"}
    assert sorted(size for _, size in ours) == sorted(stored * (len(ours) // len(stored)))  # whole packed leaves
    assert any(dtype == "f32" for dtype, _ in xla_alone)  # XLA's own choice: gather the decoded weights
    assert 4 * sum(size for _, size in ours) < sum(4 * size for dtype, size in xla_alone if dtype in ("f32", "s32"))


def test_scanned_layers_gather_one_layer_at_a_time_forward_and_backward():
    """With the layers in a lax.scan, the packed gathers sit inside the forward and the backward loop
    bodies, never in the entry computation: no step holds every layer's whole weight."""
    _, model, mesh = _sharded_tiny_model(layers=2)
    model.remat = "layer"
    graphdef, lora, frozen = _split_for(model, mesh)
    ids = parallel.global_array(np.zeros((8, 16), np.int32), NamedSharding(mesh, P(parallel.BATCH_AXES)))

    def loss(lora, frozen, ids):
        return jnp.sum(nnx.merge(graphdef, lora, frozen).hidden_states(ids) ** 2)

    with parallel.use(mesh):
        hlo = jax.jit(jax.grad(loss)).lower(lora, frozen, ids).compile().as_text()
    per_computation, name = {}, None
    for line in hlo.splitlines():
        if line.endswith("{") and not line.startswith(" "):
            name = "ENTRY" if line.startswith("ENTRY") else line.split()[0]
        per_computation.setdefault(name, []).extend(t for t, _ in _gathers(line))
    packed = {name: types for name, types in per_computation.items() if "u8" in types}
    assert "ENTRY" not in packed and len(packed) == 2  # the forward loop body and the backward loop body
    assert all(len(types) == 14 for types in packed.values())  # one layer: 7 projections x (codes, absmax)


def test_dropout_is_the_same_on_every_mesh():
    """Dropout masks come from the key alone, not from how the batch is split (partitionable threefry)."""
    linear = QLoRALinear(64, 32, quant=QuantConfig(), lora=LoraConfig(rank=4, dropout=0.5), compute_dtype=jnp.float32,
                         rngs=nnx.Rngs(0))
    linear.load_weight(jax.random.normal(jax.random.key(1), (32, 64)))
    linear.lora_b.set_value(jax.random.normal(jax.random.key(2), (32, 4)))
    graphdef, state = nnx.split(linear)
    x = np.random.default_rng(0).normal(size=(8, 16, 64)).astype(np.float32)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x, nnx.Rngs(dropout=jax.random.key(7)))

    single = forward(state, x)
    assert not np.allclose(np.asarray(single), np.asarray(nnx.merge(graphdef, state)(x)))  # dropout is on
    mesh = parallel.make_mesh(MeshConfig(2, 4))
    with parallel.use(mesh):
        sharded = forward(parallel.replicate(state, mesh),
                          parallel.global_array(x, NamedSharding(mesh, P(parallel.BATCH_AXES))))
    # a different mask changes outputs by O(1); the products split over the mesh may reassociate f32 sums
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-5)


def test_mesh_and_distributed_settings_are_checked():
    with pytest.raises(ValueError, match=r"mesh: data=3 x fsdp=1 = 3 devices, but this run has 8 \(1 process"):
        parallel.make_mesh(MeshConfig(3, 1))
    assert parallel.make_mesh(MeshConfig(1, 1)) is None
    mesh = parallel.make_mesh(MeshConfig(2, 4))
    assert mesh.axis_names == parallel.BATCH_AXES and dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto, jax.sharding.AxisType.Auto)
    assert parallel.optimizer_spec((64, 4), mesh) == P(parallel.BATCH_AXES)  # AdamW moments: split over all 8
    assert parallel.optimizer_spec((4, 64), mesh) == parallel.optimizer_spec((), mesh) == P()
    with pytest.raises(ValueError, match=r"mesh\.fsdp=0 must be an integer >= 1"):
        MeshConfig(1, 0)
    assert parallel.initialize_distributed({}) is False
    with pytest.raises(ValueError, match=r"JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES must be set"):
        parallel.initialize_distributed({"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 must be below JAX_NUM_PROCESSES=2"):
        parallel.initialize_distributed({"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "2",
                                         "JAX_PROCESS_ID": "2"})


@pytest.mark.slow
def test_two_processes_save_together_and_process_0_writes_the_results(mesh_runs):
    run_dir = mesh_runs[(2, 4)]
    logs = [(run_dir.parent / f"process_{index}.log").read_text() for index in range(2)]
    assert "done: held-out loss" in logs[0] and "done:" not in logs[1]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_2", "step_3"]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert json.loads((run_dir / "summary.json").read_text())["train_step_compilations"] == 1
