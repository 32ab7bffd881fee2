"""Training checkpoints with orbax: ``<out>/<run>/checkpoints/step_<n>/``.

Each checkpoint holds the LoRA parameters, the optimizer state (both pytrees of
arrays) and a JSON record of the step, the data iterator position and the state's
``layout`` (``LAYOUT``: the decoder layers' arrays stacked ``[L, ...]``; checkpoints
written before, with one entry per layer, have none and are refused on resume). Orbax writes
into a temporary directory and renames it when complete, so a crash never leaves
a checkpoint that restores half-written; only the newest ``keep`` are kept.
"""

from pathlib import Path

import jax
import orbax.checkpoint as ocp

LAYOUT = "stacked-layers"


class Checkpoints:
    def __init__(self, run_dir: Path, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, step_prefix="step", create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def meta(self, step: int) -> dict:
        """The JSON record of checkpoint ``step`` alone (no arrays are read)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, like: dict) -> tuple[dict, dict]:
        """Restore checkpoint ``step`` into arrays shaped like ``like`` (a pytree of arrays)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                      meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def close(self) -> None:
        self.manager.close()
