"""``python -m qlora_jax.train --config FILE [--set section.key=value ...] [--resume]``: QLoRA fine-tuning.

Loads the base model with its linear layers frozen in 4 bits, adds LoRA adapters,
and trains only the adapters with AdamW on the configured data. Writes into
``<train.out_dir>/<train.run_name>/``: ``config.yaml`` (resolved), ``metrics.jsonl``,
TensorBoard events, ``checkpoints/step_<n>/``, ``adapter/`` (PEFT format),
``loss_curve.png`` and ``summary.json``. A run directory that already holds a
checkpoint is resumed from it.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from . import assets
from .checkpoint import Checkpoints
from .config import RunConfig
from .config_io import ConfigError, dump_run_config, load_run_config, to_plain_dict
from .data import IGNORE, BatchIterator, DataError, eval_batches, load_dataset
from .loading import load_model
from .lora import LoRAParam
from .metrics import MetricsWriter, read_metrics, write_loss_png
from .peft import save_peft_adapter
from .tokenizer import load_tokenizer

BUILTIN_MODELS = {"smollm2-135m-instruct": assets.prepared_smollm2}


def resolve_model_dir(path: str) -> Path:
    """A model directory, converting a built-in model on first use."""
    if path in BUILTIN_MODELS:
        return BUILTIN_MODELS[path]()
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"model.path {path!r} is neither a directory nor one of {sorted(BUILTIN_MODELS)}")
    return directory


def resolve_compute_dtype(name: str):
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def token_loss_sums(model, batch: dict, dropout_key) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross entropy over target tokens of one micro-batch ``[B, T]``, and their count."""
    rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
    logits = model(batch["input_ids"], batch["attention_mask"], rngs=rngs)[:, :-1]  # f32[B, T-1, V]
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, labels, 0))
    return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(mask)


def make_train_step(graphdef, tx, donate: bool):
    """One optimizer step over ``[A, B, T]`` micro-batches; gradients only for the LoRA parameters."""

    def step(lora, opt_state, frozen, batch, key):
        def micro(carry, inputs):
            grad_sum, loss_sum, count_sum = carry
            micro_batch, index = inputs

            def loss_fn(lora_params):
                model = nnx.merge(graphdef, lora_params, frozen)
                return token_loss_sums(model, micro_batch, jax.random.fold_in(key, index))

            (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora)
            return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss, count_sum + count), None

        zeros = jax.tree.map(jnp.zeros_like, lora)
        steps = batch["input_ids"].shape[0]
        (grad_sum, loss_sum, count), _ = jax.lax.scan(micro, (zeros, 0.0, 0), (batch, jnp.arange(steps)))
        denominator = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denominator, grad_sum)
        updates, opt_state = tx.update(grads, opt_state, lora)
        lora = optax.apply_updates(lora, updates)
        metrics = {"loss": loss_sum / denominator, "grad_norm": optax.tree.norm(grads), "target_tokens": count}
        return lora, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def make_eval_step(graphdef):
    def evaluate(lora, frozen, batch):
        model = nnx.merge(graphdef, lora, frozen)
        return token_loss_sums(model, {k: v[0] for k, v in batch.items()}, None)

    return jax.jit(evaluate)


def _held_out_loss(eval_step, lora, frozen, batches) -> float:
    total, count = 0.0, 0
    for batch in batches:
        loss, n = eval_step(lora, frozen, batch)
        total, count = total + float(loss), count + int(n)
    return total / max(count, 1)


def _check_resume(run_dir: Path, config: RunConfig) -> None:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    previous = load_run_config(saved)
    previous = dataclasses.replace(previous, quant=dataclasses.replace(previous.quant, kernel=config.quant.kernel))
    for section in ("model", "quant", "lora", "data"):  # the kernel may change: it does not change the results
        if getattr(previous, section) != getattr(config, section):
            raise ConfigError(f"{run_dir} holds a run with a different {section!r} section ({saved}); "
                              f"use another train.run_name or delete the run directory to start over")


def train(config: RunConfig, log=print) -> dict:
    """Run (or resume) the fine-tune described by ``config``; returns the summary written to summary.json."""
    run_dir = config.train.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpoints(run_dir, config.train.keep_checkpoints)
    resume_step = checkpoints.latest_step()
    if resume_step is not None:
        _check_resume(run_dir, config)
    dump_run_config(config, run_dir / "config.yaml")

    model_dir = resolve_model_dir(config.model.path)
    compute_dtype = resolve_compute_dtype(config.model.compute_dtype)
    tokenizer = load_tokenizer(model_dir)
    dataset = load_dataset(config.data, tokenizer, config.train.seed)
    log(f"data: {len(dataset.train)} train / {len(dataset.eval)} held-out examples; {dataset.truncated} truncated "
        f"to the length limits, {dataset.dropped} dropped (no target token within the limits), "
        f"{dataset.skipped} malformed skipped")
    q = config.quant
    model = load_model(model_dir, quant=q.quant_type, blocksize=q.blocksize, double_quant=q.double_quant,
                       lora=config.lora, compute_dtype=compute_dtype, seed=config.train.seed, verbose=True,
                       kernel=q.kernel)
    model.remat = config.train.gradient_checkpointing
    model.scan_layers = config.train.scan_layers
    graphdef, lora, frozen = nnx.split(model, LoRAParam, ...)
    tx, schedule = config.optimizer.build(config.train.steps)
    opt_state = tx.init(lora)
    chat_like = config.data.format in ("chitchat", "chat", "text")
    max_length = config.data.max_len if chat_like else config.data.source_max_len + config.data.target_max_len
    iterator = BatchIterator(dataset.train, config.train.batch_size, config.train.grad_accum, config.train.seed,
                             config.data.group_by_length, tokenizer.pad_id, max_length, config.data.bucket)
    start = 0
    if resume_step is not None:
        state, meta = checkpoints.restore(resume_step, {"lora": lora, "opt_state": opt_state})
        lora, opt_state = state["lora"], state["opt_state"]
        iterator.restore(meta["data"])
        start = resume_step
        log(f"resumed from {run_dir}/checkpoints/step_{resume_step}")

    train_step = make_train_step(graphdef, tx, donate=jax.default_backend() != "cpu")
    eval_step = make_eval_step(graphdef)
    held_out = list(eval_batches(dataset.eval, config.train.batch_size, tokenizer.pad_id, max_length,
                                 config.data.bucket, config.train.eval_batches))
    if start == 0:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
    writer = MetricsWriter(run_dir)
    key = jax.random.key(config.train.seed)
    summary = {"initial_eval_loss": None}
    if start == 0:
        summary["initial_eval_loss"] = _held_out_loss(eval_step, lora, frozen, held_out)
        writer.write(0, {"eval_loss": summary["initial_eval_loss"],
                         "eval_perplexity": float(np.exp(summary["initial_eval_loss"]))})
        log(f"step 0: held-out loss {summary['initial_eval_loss']:.4f}")
    started = time.perf_counter()
    tokens_seen = 0
    evaluated_last = False
    progress = tqdm(range(start, config.train.steps), initial=start, total=config.train.steps, desc="train",
                    dynamic_ncols=True, disable=None)
    for step in progress:
        batch = next(iterator)
        step_start = time.perf_counter()
        lora, opt_state, metrics = train_step(lora, opt_state, frozen, batch, jax.random.fold_in(key, step))
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
            raise FloatingPointError(f"step {step + 1}: loss is {loss}; stopping (no checkpoint written)")
        elapsed = time.perf_counter() - step_start
        tokens = int(batch["attention_mask"].sum())
        tokens_seen += tokens
        values = {"loss": loss, "lr": float(schedule(step)), "grad_norm": float(metrics["grad_norm"]),
                  "tokens_per_s": tokens / elapsed, "step_seconds": elapsed}
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{values['lr']:.2e}", tok_s=f"{values['tokens_per_s']:.0f}")
        done = step + 1
        eval_now = done % config.train.eval_every == 0 if config.train.eval_every else done == config.train.steps
        if eval_now:
            values["eval_loss"] = _held_out_loss(eval_step, lora, frozen, held_out)
            values["eval_perplexity"] = float(np.exp(values["eval_loss"]))
            progress.write(f"step {done}: held-out loss {values['eval_loss']:.4f}")
        if done % config.train.log_every == 0 or eval_now:
            writer.write(done, values)
        evaluated_last = eval_now
        if (config.train.save_every and done % config.train.save_every == 0) or done == config.train.steps:
            checkpoints.save(done, {"lora": lora, "opt_state": opt_state},
                             {"step": done, "data": iterator.state()})
    progress.close()
    wall = time.perf_counter() - started
    if not evaluated_last:  # the last step was not an evaluation step (or the run was already finished)
        final = _held_out_loss(eval_step, lora, frozen, held_out)
        writer.write(config.train.steps, {"eval_loss": final, "eval_perplexity": float(np.exp(final))})
    writer.close()
    checkpoints.close()
    model = nnx.merge(graphdef, lora, frozen)
    save_peft_adapter(model, run_dir / "adapter", str(model_dir))
    history = read_metrics(run_dir)
    write_loss_png(run_dir / "loss_curve.png", {
        "train": [(m["step"], m["loss"]) for m in history if "loss" in m],
        "eval": [(m["step"], m["eval_loss"]) for m in history if "eval_loss" in m]})
    evals = [m["eval_loss"] for m in history if "eval_loss" in m]
    summary.update({
        "initial_eval_loss": summary["initial_eval_loss"] if summary["initial_eval_loss"] is not None else evals[0],
        "final_eval_loss": evals[-1], "steps": config.train.steps, "resumed_from": resume_step,
        "train_seconds": wall, "tokens_per_second": tokens_seen / wall if wall else 0.0,
        "median_step_tokens_per_second": float(np.median([m["tokens_per_s"] for m in history if "tokens_per_s" in m]
                                                         or [0.0])),
        "adapter": str(run_dir / "adapter"), "model_dir": str(model_dir),
        "train_step_compilations": train_step._cache_size(),  # one per padded length bucket seen
        "config": to_plain_dict(config),
    })
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"done: held-out loss {summary['initial_eval_loss']:.4f} -> {summary['final_eval_loss']:.4f}; "
        f"adapter in {run_dir / 'adapter'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_jax.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="YAML run config (default: configs/default.yaml's settings)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="require a checkpoint to resume from (a run directory with one is resumed anyway)")
    args = parser.parse_args(argv)
    try:
        config = load_run_config(args.config, args.overrides)
        if args.resume and Checkpoints(config.train.run_dir, 1).latest_step() is None:
            raise ConfigError(f"--resume: {config.train.run_dir} has no checkpoint to resume from")
        train(config)
    except (ConfigError, DataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
