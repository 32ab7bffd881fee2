"""Which settings a resumed run may change, and the check that refuses the others in one line.

A run directory's ``config.yaml`` records the settings its checkpoints were trained with.
Resuming with a changed setting is allowed only where the checkpoint still means the same
thing: the keys in ``RESUMABLE`` (with the reason), and ``train.steps`` under a constant
schedule. Every other key is refused, with the reason in ``REFUSED`` for its section or key
(the README's resume table is this module).
"""

from pathlib import Path

from .config import RunConfig
from .config_io import ConfigError, load_run_config, to_plain_dict

RESUMABLE = {
    "quant.kernel": "the kernel changes no stored bytes, only how the product is computed",
    "train.eval_every": "logging", "train.eval_batches": "logging (held-out batches measured, not trained on)",
    "train.save_every": "checkpoint cadence", "train.keep_checkpoints": "checkpoint cadence",
    "train.log_every": "logging", "train.max_bad_steps": "when to give up on non-finite steps",
    "train.mmlu_dir": "logging", "train.mmlu_every": "logging", "train.mmlu_k": "logging",
    "train.gradient_checkpointing": "what is recomputed, not what is computed",
    "train.loss_chunk": "how the loss is split, not its value",
    "train.out_dir": "where the run lives", "train.run_name": "where the run lives",
    "train.compilation_cache": "where compiled programs are kept",
    "optimizer.offload": "where AdamW's state lives between steps (the same training, to float rounding)",
    "mesh.data": "checkpoints restore onto any mesh", "mesh.fsdp": "checkpoints restore onto any mesh",
}
STEPS_WITH_CONSTANT_SCHEDULE = "train.steps"

REFUSED = {
    "model": "the checkpoint's adapters were trained on that base model",
    "quant": "the checkpoint's adapters were trained on that quantized base",
    "lora": "the checkpoint holds adapters of that shape and scaling",
    "lora.dtype": "the checkpoint holds adapters of that precision",
    "data": "the saved data position would point at other examples (skipped or repeated data)",
    "optimizer": "the learning-rate schedule or update rule would change mid-run",
    "train.seed": "the held-out split and batch order would change (held-out examples could leak into training)",
    "train.batch_size": "the saved data position would point at other examples (skipped or repeated data)",
    "train.grad_accum": "the saved data position would point at other examples (skipped or repeated data)",
    "train.steps": "a cosine schedule's curve depends on the total steps",
}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def refusal_reason(key: str) -> str:
    return REFUSED.get(key) or REFUSED.get(key.split(".")[0], "it changes what the checkpoint means")


def changed_keys(previous: RunConfig, config: RunConfig) -> list[tuple[str, object, object]]:
    """The keys a resume may not change that differ: ``(key, previous value, new value)``, in config order."""
    before, after = _flat(to_plain_dict(previous)), _flat(to_plain_dict(config))
    constant = before.get("optimizer.schedule") == after.get("optimizer.schedule") == "constant"
    return [(key, before.get(key), after.get(key)) for key in after
            if before.get(key) != after.get(key) and key not in RESUMABLE
            and not (key == STEPS_WITH_CONSTANT_SCHEDULE and constant)]


def check_resume(run_dir: Path, config: RunConfig, checkpoint_step: int) -> None:
    """Refuse, in one line, a resume whose settings the checkpoint in ``run_dir`` cannot continue."""
    fresh = (f"to start over instead, use --set train.run_name=NEW_NAME or delete {run_dir}")
    if config.train.steps < checkpoint_step:
        raise ConfigError(f"train.steps={config.train.steps} is smaller than step {checkpoint_step} of the checkpoint "
                          f"in {run_dir}; set train.steps >= {checkpoint_step} to resume, or {fresh}")
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    changes = changed_keys(load_run_config(saved), config)
    if changes:
        key, old, new = changes[0]
        more = f" (also changed: {', '.join(k for k, _, _ in changes[1:])})" if changes[1:] else ""
        raise ConfigError(f"{run_dir} holds a run trained with {key}={old!r}, this run has {key}={new!r}{more}: "
                          f"resuming would be wrong because {refusal_reason(key)}; keep {key}={old!r} to resume, "
                          f"or {fresh}")
