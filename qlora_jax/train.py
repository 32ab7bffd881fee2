"""``python -m qlora_jax.train --config FILE [--set section.key=value ...] [--resume]``: QLoRA fine-tuning.

Loads the base model with its linear layers frozen in 4 bits, adds LoRA adapters,
and trains only the adapters with AdamW on the configured data. Writes into
``<train.out_dir>/<train.run_name>/``: ``config.yaml`` (resolved), ``metrics.jsonl``,
TensorBoard events, ``checkpoints/step_<n>/``, ``adapter/`` (PEFT format),
``loss_curve.png`` and ``summary.json``. A run directory that already holds a
checkpoint is resumed from it.

``mesh: {data: D, fsdp: F}`` trains on D x F devices (``qlora_jax.parallel``); on several
hosts every process runs the same command (``parallel.initialize_distributed`` reads the
environment), all of them save the checkpoints together and process 0 writes the other files.
"""

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from . import atomic, parallel
from .checkpoint import LAYOUT, Checkpoints
from .compile_cache import enable_compilation_cache
from .config import QuantConfig, RunConfig
from .config_io import ConfigError, dump_run_config, load_run_config, to_plain_dict
from .data import BatchIterator, DataError, eval_batches, load_dataset
from .evaluate import mmlu
from .export import write_bnb
from .loading import load_model
from .lora import LoRAParam
from .loss import token_loss
from .metrics import MetricsWriter, read_metrics, truncate_metrics, write_loss_plot
from .model_source import compute_dtype, resolve_model_dir, source_name
from .offload import update_by_layer
from .peft import load_peft_adapter, save_peft_adapter
from .progress import make_progress
from .resume import check_resume
from .tokenizer import load_tokenizer


def token_loss_sums(model, batch: dict, dropout_key, loss_chunk: int, grad_accumulator=None) -> tuple[jax.Array,
                                                                                                       jax.Array]:
    """Summed next-token cross entropy over target tokens of one micro-batch ``[B, T]``, and their count.

    ``grad_accumulator``: gradients shaped like the model's adapters, which the backward pass adds its own
    to in place (``LlamaForCausalLM.hidden_states``)."""
    rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
    layers_sum = grad_accumulator["layers"] if grad_accumulator is not None else None
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], rngs=rngs,
                                 grad_accumulator=layers_sum)[:, :-1]  # [B, T-1, D]
    return token_loss(hidden, batch["labels"][:, 1:], model.unembedding(), loss_chunk)


def make_train_step(graphdef, tx, donate: bool, loss_chunk: int = 0, offload: str = "none", layout=None):
    """One optimizer step over ``[A, B, T]`` micro-batches; gradients only for the LoRA parameters.

    A step whose loss or gradient norm is not finite is not applied (``lax.cond``, so the
    update is computed only when it is applied and can be written in place of the donated
    state): the parameters and optimizer state come back unchanged and ``metrics["applied"]``
    is False. A finite gradient norm bounds every squared gradient, so AdamW's update of
    finite state is finite.
    ``offload`` (``OptimConfig.offload``): the optimizer state (and with ``host_with_params``
    the LoRA parameters) arrive in and return to pinned host memory; they visit the device
    only inside the step, one decoder layer at a time on one device (``offload.update_by_layer``),
    each device's share at once on a mesh. ``donate`` reuses the device buffers of the inputs
    (never on CPU). ``tx`` gets the gradients' global norm as ``global_norm`` (``clip``).
    ``layout``: the device shardings of ``(lora, opt_state)`` on a mesh; the step returns them
    laid out the same way (else XLA picks, and the next step would compile again).
    """
    offload_params = offload == "host_with_params"
    by_layer = offload != "none" and layout is None
    tx = optax.with_extra_args_support(tx)

    def step(lora, opt_state, frozen, batch, key):
        if offload != "none" and not by_layer:
            opt_state = jax.device_put(opt_state, jax.memory.Space.Device)
        if offload_params:
            lora = jax.device_put(lora, jax.memory.Space.Device)

        def gradients(micro_batch, index, grad_sum):
            def loss_fn(lora_params):
                model = nnx.merge(graphdef, lora_params, frozen)
                return token_loss_sums(model, micro_batch, jax.random.fold_in(key, index), loss_chunk, grad_sum)

            (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora)
            return grads, loss, count

        # With layer checkpointing (and every adapter in the decoder layers) the backward pass adds each
        # micro-batch's gradients into the running sum in place; otherwise they are added afterwards.
        in_place = nnx.merge(graphdef, lora, frozen).remat == "layer" and set(lora.keys()) == {"layers"}

        def micro(carry, inputs):
            grad_sum, loss_sum, count_sum = carry
            if in_place:
                grad_sum, loss, count = gradients(*inputs, grad_sum)
            else:
                grads, loss, count = gradients(*inputs, None)
                grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            return (grad_sum, loss_sum + loss, count_sum + count), None

        zeros = (jax.tree.map(jnp.zeros_like, lora), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        (grads, loss_sum, count), _ = jax.lax.scan(micro, zeros, (batch, jnp.arange(batch["input_ids"].shape[0])))
        denominator = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: (g / denominator).astype(g.dtype), grads)  # the adapters' dtype
        grad_norm = optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
        applied = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
        metrics = {"loss": loss_sum / denominator, "grad_norm": grad_norm, "target_tokens": count,
                   "applied": applied}
        if by_layer:
            new_lora, new_opt_state = update_by_layer(tx, lora, opt_state, grads, grad_norm, applied, offload_params)
            return new_lora, new_opt_state, metrics

        def update(lora, opt_state, grads):
            updates, new_opt_state = tx.update(grads, opt_state, lora, global_norm=grad_norm)
            return optax.apply_updates(lora, updates), new_opt_state

        new_lora, new_opt_state = jax.lax.cond(applied, update, lambda lora, opt_state, _: (lora, opt_state),
                                               lora, opt_state, grads)
        if layout is not None:
            new_lora, new_opt_state = jax.lax.with_sharding_constraint((new_lora, new_opt_state), layout)
        if offload != "none":
            new_opt_state = jax.device_put(new_opt_state, jax.memory.Space.Host)
        if offload_params:
            new_lora = jax.device_put(new_lora, jax.memory.Space.Host)
        return new_lora, new_opt_state, metrics

    donated = () if not donate else (0, 1) if offload == "none" else (1,) if offload_params else (0,)
    return jax.jit(step, donate_argnums=donated)


def make_eval_step(graphdef, loss_chunk: int = 0):
    def evaluate(lora, frozen, batch):
        model = nnx.merge(graphdef, jax.device_put(lora, jax.memory.Space.Device), frozen)
        return token_loss_sums(model, {k: v[0] for k, v in batch.items()}, None, loss_chunk)

    return jax.jit(evaluate)


def _held_out_loss(eval_step, lora, frozen, batches) -> float:
    total, count = 0.0, 0
    for batch in batches:
        loss, n = eval_step(lora, frozen, batch)
        total, count = total + float(loss), count + int(n)
    return total / max(count, 1)


class TrainingStopped(RuntimeError):
    """The run stopped before its last step for a reason the user can fix (the message says which)."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived: a checkpoint of the last finished step was saved."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint saved in {run_dir}/checkpoints; "
                         f"run the same command again to resume")


class _StopRequests:
    """Turns SIGINT and SIGTERM into a flag the loop checks between steps (a second signal stops at once)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "_StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def latest_checkpoint(run_dir: Path) -> int | None:
    """The newest complete checkpoint step of a run directory (read only; None if there is none)."""
    if not (run_dir / "checkpoints").is_dir():
        return None
    checkpoints = Checkpoints(run_dir, 1)
    try:
        return checkpoints.latest_step()
    finally:
        checkpoints.close()


def _check_output_location(run_dir: Path) -> Path:
    """Fail before any loading if the run directory cannot be created or written; returns its nearest existing
    ancestor (or itself)."""
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"train.out_dir: {existing} is not a directory, so {run_dir} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"train.out_dir: no permission to write in {existing}")
    return existing


def _check_free_space(location: Path, lora, opt_state, keep: int) -> None:
    """Checkpoints (kept + one being written) and the adapter must fit on the output disk."""
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((lora, opt_state)))
    lora_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(lora))
    needed = (keep + 1) * state_bytes + 2 * lora_bytes + (16 << 20)  # + metrics, events, plots
    free = shutil.disk_usage(location).free
    if free < needed:
        raise ConfigError(f"train.out_dir: {location} has {free / 2**20:.0f} MiB free; checkpoints and the adapter "
                          f"need about {needed / 2**20:.0f} MiB (lower train.keep_checkpoints or free space)")


def _read_inputs(config: RunConfig, log):
    """The model directory, tokenizer and data, validated before anything is loaded onto devices or written."""
    model_dir = resolve_model_dir(config.model.path, config.model.revision, "model.path")
    tokenizer = load_tokenizer(model_dir)
    dataset = load_dataset(config.data, tokenizer, config.train.seed)
    log(f"data: {len(dataset.train)} train / {len(dataset.eval)} held-out examples; {dataset.truncated} truncated "
        f"to the length limits, {dataset.dropped} dropped (no target token within the limits), "
        f"{dataset.skipped} malformed skipped")
    if config.train.mmlu_every and not (Path(config.train.mmlu_dir).expanduser() / "test").is_dir():
        raise FileNotFoundError(f"train.mmlu_dir={config.train.mmlu_dir!r} has no test/ directory (MMLU's layout)")
    return model_dir, tokenizer, dataset


def _load_model(config: RunConfig, model_dir: Path, mesh):
    model = load_model(model_dir, quant=config.quant, lora=config.lora,
                       compute_dtype=compute_dtype(config.model.compute_dtype), seed=config.train.seed, verbose=True,
                       mesh=mesh, remat=config.train.gradient_checkpointing)
    if config.model.adapter:
        load_peft_adapter(model, Path(config.model.adapter).expanduser())
    return model


def _restore(run_dir: Path, step: int, lora, opt_state):
    """The state of checkpoint ``step``, read before anything is written; a damaged one is refused, named."""
    checkpoints = Checkpoints(run_dir, 1)
    try:
        layout = checkpoints.meta(step).get("layout")
        if layout == LAYOUT:
            state, meta = checkpoints.restore(step, {"lora": lora, "opt_state": opt_state})
    except Exception as err:  # orbax/tensorstore raise many types for damaged files; all mean the same here
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{run_dir}/checkpoints/step_{step} cannot be restored ({reason}); delete that directory "
                          "to resume from the checkpoint before it, or use --set train.run_name=NEW_NAME to start "
                          "over") from None
    finally:
        checkpoints.close()
    if layout != LAYOUT:
        raise ConfigError(f"{run_dir}/checkpoints/step_{step} holds one entry per decoder layer, the layout of "
                          "qlora_jax 0.1; this version stores the layers stacked and cannot resume it: use --set "
                          "train.run_name=NEW_NAME to start over (its adapter/ directory still loads as a PEFT "
                          "adapter, e.g. as model.adapter)")
    return state["lora"], state["opt_state"], meta["data"]


def train(config: RunConfig, log=print) -> dict:
    """Run (or resume) the fine-tune described by ``config``; returns the summary written to summary.json.

    Raises ``ConfigError``/``DataError``/``ValueError``/``FileNotFoundError`` for bad input
    before writing anything, ``TrainingStopped`` when the run cannot go on, and
    ``Interrupted`` after SIGINT/SIGTERM (with a checkpoint saved).
    """
    run_dir = config.train.run_dir
    if config.train.compilation_cache:
        enable_compilation_cache()
    resume_step = latest_checkpoint(run_dir)
    location = _check_output_location(run_dir)
    mesh = _make_mesh(config)
    model_dir, tokenizer, dataset = _read_inputs(config, log)
    if resume_step is not None:  # after the inputs themselves: a bad model.path is reported as such
        check_resume(run_dir, config, resume_step)
    model = _load_model(config, model_dir, mesh)
    graphdef, lora, frozen = nnx.split(model, LoRAParam, ...)
    tx, schedule = config.optimizer.build(config.train.steps)
    opt_state = tx.init(lora)
    if mesh is not None:
        lora, opt_state = parallel.replicate(lora, mesh), parallel.shard_optimizer_state(opt_state, mesh)
    else:  # committed like the step's outputs, so the second step reuses the first one's compilation
        lora, opt_state = jax.device_put((lora, opt_state), jax.devices()[0])
    _check_free_space(location, lora, opt_state, config.train.keep_checkpoints)
    if resume_step is not None:
        lora, opt_state, data_position = _restore(run_dir, resume_step, lora, opt_state)

    primary = parallel.is_primary()
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpoints(run_dir, config.train.keep_checkpoints)
    if primary:
        dump_run_config(config, run_dir / "config.yaml")
        base_dir = loftq_base(config, run_dir)
        if base_dir:
            write_bnb(model, model_dir, base_dir)
            log(f"LoftQ base (quantized {config.lora.loftq_iters} times): {base_dir}")
    chat_like = config.data.format in ("chitchat", "chat", "text")
    max_length = config.data.max_len if chat_like else config.data.source_max_len + config.data.target_max_len
    iterator = BatchIterator(dataset.train, config.train.batch_size, config.train.grad_accum, config.train.seed,
                             config.data.group_by_length, tokenizer.pad_id, max_length, config.data.bucket)
    if resume_step is not None:
        iterator.restore(data_position)
        if primary:
            truncate_metrics(run_dir, resume_step)
        log(f"resumed from {run_dir}/checkpoints/step_{resume_step}")
    elif primary:  # a fresh run starts fresh logs (a run killed before its first checkpoint leaves some)
        for stale in [run_dir / "metrics.jsonl", *run_dir.glob("events.out.tfevents.*")]:
            stale.unlink(missing_ok=True)
    offload = config.optimizer.offload
    if offload != "none":
        opt_state = jax.device_put(opt_state, jax.memory.Space.Host)
    if offload == "host_with_params":
        lora = jax.device_put(lora, jax.memory.Space.Host)
    loop = _Loop(config, graphdef, frozen, schedule, checkpoints, iterator, run_dir, tokenizer, mesh,
                 purge_step=None if resume_step is None else resume_step + 1)
    loop.held_out = [loop.to_devices(batch) for batch in eval_batches(
        dataset.eval, config.train.batch_size, tokenizer.pad_id, max_length, config.data.bucket,
        config.train.eval_batches)]
    try:
        with parallel.use(mesh):
            lora = loop.run(tx, lora, opt_state, resume_step or 0, log)
    finally:
        if loop.writer is not None:
            loop.writer.close()
        checkpoints.close()
    if not primary:
        return {}
    model = nnx.merge(graphdef, lora, frozen)
    base = loftq_base(config, run_dir) or source_name(config.model.path, model_dir)
    save_peft_adapter(model, run_dir / "adapter", str(base))
    return _write_summary(run_dir, config, loop, resume_step, model_dir, log)


def loftq_base(config: RunConfig, run_dir: Path) -> Path | None:
    """Where a run with ``lora.loftq_iters`` > 1 keeps its base (a bitsandbytes 4-bit checkpoint): LoftQ's
    alternation re-quantizes ``W - scaling * B @ A``, so that base is not the quantization of the original
    weights and the adapter belongs to it (its ``base_model_name_or_path``). None for other runs."""
    return run_dir / "base" if config.lora.init == "loftq" and config.lora.loftq_iters > 1 else None


def _make_mesh(config: RunConfig):
    """The run's device mesh (None on one device), checked against the batch size."""
    mesh = parallel.make_mesh(config.mesh)
    if mesh is not None and config.train.batch_size % config.mesh.size:
        raise ConfigError(f"train.batch_size={config.train.batch_size} must be a multiple of mesh.data x mesh.fsdp "
                          f"= {config.mesh.size} (every device trains on its own rows)")
    return mesh


class _Loop:
    """The step loop: logging, evaluation, checkpoints, non-finite steps and stop signals."""

    def __init__(self, config: RunConfig, graphdef, frozen, schedule, checkpoints: Checkpoints,
                 iterator: BatchIterator, run_dir: Path, tokenizer, mesh, purge_step: int | None):
        self.config, self.frozen, self.schedule = config, frozen, schedule
        self.checkpoints, self.iterator, self.run_dir = checkpoints, iterator, run_dir
        self.graphdef, self.mesh = graphdef, mesh
        self.eval_step = make_eval_step(graphdef, config.train.loss_chunk)
        self.writer = MetricsWriter(run_dir, purge_step) if parallel.is_primary() else None
        self.held_out: list = []
        self.tokenizer = tokenizer  # MMLU prompts
        self.initial_eval_loss = None
        self.tokens_seen, self.wall, self.compilations, self.bad_streak = 0, 0.0, 0, 0

    def to_devices(self, batch: dict) -> dict:
        """A host batch ``[A, B, T]`` as the step takes it: split over the mesh, if there is one."""
        return parallel.shard_batch(batch, self.mesh) if self.mesh is not None else batch

    def record(self, step: int, values: dict) -> None:
        if self.writer is not None:
            self.writer.write(step, values)

    def evaluate(self, lora) -> float:
        return _held_out_loss(self.eval_step, lora, self.frozen, self.held_out)

    def save(self, step: int, lora, opt_state) -> None:
        try:
            self.checkpoints.save(step, {"lora": lora, "opt_state": opt_state},
                                  {"step": step, "data": self.iterator.state(), "layout": LAYOUT})
        except OSError as err:
            previous = self.checkpoints.latest_step()
            raise TrainingStopped(f"could not write checkpoint step {step} in {self.run_dir}/checkpoints "
                                  f"({err.strerror or err}); the previous checkpoint (step {previous}) is intact; "
                                  "free space and run the same command again to resume") from None

    def run(self, tx, lora, opt_state, start: int, log):
        """Steps ``start`` .. ``train.steps``: each trains, then evaluates, logs and saves when due."""
        settings = self.config.train
        layout = jax.tree.map(lambda leaf: NamedSharding(self.mesh, leaf.sharding.spec), (lora, opt_state)) \
            if self.mesh is not None else None
        train_step = make_train_step(self.graphdef, tx, donate=jax.default_backend() != "cpu",
                                     loss_chunk=settings.loss_chunk, offload=self.config.optimizer.offload,
                                     layout=layout)
        if start == 0:
            self.initial_eval_loss = self.evaluate(lora)
            self.record(0, {"eval_loss": self.initial_eval_loss,
                            "eval_perplexity": float(np.exp(self.initial_eval_loss))})
            log(f"step 0: held-out loss {self.initial_eval_loss:.4f}")
        started, progress, evaluated_last = time.perf_counter(), None, False
        with _StopRequests() as stop:
            for step in range(start, settings.steps):
                done, position = step + 1, self.iterator.state()
                batch = next(self.iterator)
                if progress is None:  # the first step compiles; say so, and keep it out of the ETA
                    log(f"compiling the train step for {' x '.join(map(str, batch['input_ids'].shape))} tokens "
                        "(micro-batches x rows x length) ...")
                    compile_start = time.perf_counter()
                lora, opt_state, values = self._step(train_step, lora, opt_state, step, batch, position,
                                                     progress.write if progress else log)
                if progress is None:
                    log(f"compiled and ran step {done} in {time.perf_counter() - compile_start:.1f} s")
                    progress = make_progress(done, settings.steps, settings.log_every, parallel.is_primary())
                evaluated_last = self._evaluate_if_due(done, lora, values, progress.write)
                progress.update(done, values)
                if done % settings.log_every == 0 or evaluated_last or "mmlu_accuracy" in values:
                    self.record(done, values)
                saved_last = self._save_if_due(done, lora, opt_state)
                if stop.signum is not None:
                    progress.close()
                    if not saved_last:
                        self.save(done, lora, opt_state)
                    raise Interrupted(stop.signum, done, self.run_dir)
        if progress is not None:
            progress.close()
        self.wall = time.perf_counter() - started
        self.compilations = train_step._cache_size()  # one per padded length bucket seen
        if not evaluated_last and start < settings.steps:  # (a finished run resumed has its final evaluation)
            final = self.evaluate(lora)
            self.record(settings.steps, {"eval_loss": final, "eval_perplexity": float(np.exp(final))})
        return lora

    def _step(self, train_step, lora, opt_state, step: int, batch: dict, position: dict, write):
        """One optimizer step on ``batch`` (taken at data ``position``); a non-finite step is skipped and counted."""
        settings = self.config.train
        step_start = time.perf_counter()
        lora, opt_state, metrics = train_step(lora, opt_state, self.frozen, self.to_devices(batch),
                                              jax.random.fold_in(jax.random.key(settings.seed), step))
        loss, elapsed = float(metrics["loss"]), time.perf_counter() - step_start
        if bool(metrics["applied"]):
            self.bad_streak = 0
            tokens = int(batch["attention_mask"].sum())
            self.tokens_seen += tokens
            return lora, opt_state, {"loss": loss, "lr": float(self.schedule(step)),
                                     "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": tokens / elapsed,
                                     "step_seconds": elapsed}
        self.bad_streak += 1
        write(f"step {step + 1}: loss {loss} / gradient norm {float(metrics['grad_norm'])} is not finite; update "
              f"skipped (batch at data epoch {position['epoch']}, index {position['index']})")
        if self.bad_streak >= settings.max_bad_steps:
            raise TrainingStopped(
                f"{self.bad_streak} steps in a row (through step {step + 1}) had a non-finite loss or gradient; "
                f"stopping (train.max_bad_steps={settings.max_bad_steps}). No checkpoint holds NaN/Inf: "
                f"the newest is step {self.checkpoints.latest_step()}. Lower optimizer.lr, check the "
                "data, or use model.compute_dtype=float32")
        return lora, opt_state, {"skipped_step": 1.0}

    def _evaluate_if_due(self, done: int, lora, values: dict, write) -> bool:
        """Held-out loss (and MMLU) into ``values`` when due; whether the held-out loss was measured."""
        settings = self.config.train
        due = done % settings.eval_every == 0 if settings.eval_every else done == settings.steps
        if due:
            values["eval_loss"] = self.evaluate(lora)
            values["eval_perplexity"] = float(np.exp(values["eval_loss"]))
            write(f"step {done}: held-out loss {values['eval_loss']:.4f}")
        if settings.mmlu_every and done % settings.mmlu_every == 0:
            values["mmlu_accuracy"] = mmlu(nnx.merge(self.graphdef, lora, self.frozen), self.tokenizer,
                                           Path(settings.mmlu_dir).expanduser(), settings.mmlu_k)["mean_accuracy"]
            write(f"step {done}: MMLU accuracy {values['mmlu_accuracy']:.4f}")
        return due

    def _save_if_due(self, done: int, lora, opt_state) -> bool:
        settings = self.config.train
        due = bool(settings.save_every and done % settings.save_every == 0) or done == settings.steps
        if due:
            self.save(done, lora, opt_state)
        return due


def _write_summary(run_dir: Path, config: RunConfig, loop: _Loop, resume_step, model_dir: Path, log) -> dict:
    history = read_metrics(run_dir)
    q = config.quant
    quant = f"{q.quant_type}{'+dq' if q.double_quant and q.quantized else ''}" if q.quantized else "16-bit base"
    write_loss_plot(run_dir / "loss_curve.png", history,
                    f"{config.train.run_name}: {Path(config.model.path).name}, {quant}, LoRA r={config.lora.rank}")
    evals = [m["eval_loss"] for m in history if "eval_loss" in m]
    summary = {
        "initial_eval_loss": loop.initial_eval_loss if loop.initial_eval_loss is not None else evals[0],
        "final_eval_loss": evals[-1], "steps": config.train.steps, "resumed_from": resume_step,
        "train_seconds": loop.wall, "tokens_per_second": loop.tokens_seen / loop.wall if loop.wall else 0.0,
        "median_step_tokens_per_second": float(np.median([m["tokens_per_s"] for m in history if "tokens_per_s" in m]
                                                         or [0.0])),
        "skipped_steps": sum(1 for m in history if "skipped_step" in m),
        "adapter": str(run_dir / "adapter"), "model_dir": str(model_dir),
        "train_step_compilations": loop.compilations,
        "config": to_plain_dict(config),
    }
    atomic.write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    log(f"done: held-out loss {summary['initial_eval_loss']:.4f} -> {summary['final_eval_loss']:.4f} in "
        f"{loop.wall:.0f} s\n  adapter (PEFT format): {run_dir / 'adapter'}\n  loss plot: {run_dir / 'loss_curve.png'}"
        f"\n  try it: {try_command(run_dir / 'adapter', q)}")
    return summary


def try_command(adapter_dir: Path, quant) -> str:
    """The generate command that chats with the fine-tuned model as it was trained (its base named by the adapter)."""
    double_quant = "" if quant.double_quant else " --no-double-quant"
    flags = "" if quant.storage == QuantConfig().storage else (
        f" --quant {quant.quant_type} --blocksize {quant.blocksize}{double_quant}")
    return f"python -m qlora_jax.generate --adapter {adapter_dir}{flags} --prompt 'Hello! How are you?'"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_jax.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="YAML run config (default: configs/default.yaml's settings)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="require a checkpoint to resume from (a run directory with one is resumed anyway)")
    args = parser.parse_args(argv)
    try:
        parallel.initialize_distributed()
        config = load_run_config(args.config, args.overrides)
        if args.resume and latest_checkpoint(config.train.run_dir) is None:
            raise ConfigError(f"--resume: {config.train.run_dir} has no checkpoint to resume from")
        train(config)
    except (ConfigError, DataError, ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Interrupted as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 128 + err.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
