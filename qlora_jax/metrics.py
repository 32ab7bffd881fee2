"""Run metrics: JSON Lines, TensorBoard event files (tensorboardX) and a loss-curve PNG (matplotlib).

A resumed run drops what the killed run logged after its checkpoint: ``metrics.jsonl``
is truncated, and the new TensorBoard event file starts with a ``SessionLog.START`` at
the first step after the checkpoint (``purge_step``), which makes TensorBoard discard the
points of earlier event files from that step on (its "out of order step" purge), so each
step is shown once.
"""

import io
import json
import time
from pathlib import Path

from tensorboardX import SummaryWriter

from . import atomic


class MetricsWriter:
    """Appends step metrics to ``metrics.jsonl`` and to a new TensorBoard event file in ``run_dir``.

    ``purge_step``: the first step this process logs after resuming (TensorBoard hides earlier
    files' points from it on); None for a fresh run.
    """

    def __init__(self, run_dir: Path, purge_step: int | None = None):
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 -- closed in close()
        # A suffix per writer: a run resumed within the same second must not reuse (and overwrite) a file name.
        self.events = SummaryWriter(str(run_dir), purge_step=purge_step, filename_suffix=f".{time.time_ns()}")

    def write(self, step: int, values: dict[str, float]) -> None:
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        for tag, value in values.items():
            if isinstance(value, (int, float)):
                self.events.add_scalar(tag, float(value), step)
        self.events.flush()

    def close(self) -> None:
        self.jsonl.close()
        self.events.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``metrics.jsonl``; a line cut short by a crash is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the records after ``step`` (written after the checkpoint a run resumes from)."""
    kept = [r for r in read_metrics(run_dir) if isinstance(r, dict) and r.get("step", 0) <= step]
    atomic.write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))


def _smoothed(values: list[float], weight: float = 0.6) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average with bias correction (weight 0.6, its default)."""
    out, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** count))
    return out


def write_loss_plot(path: Path, history: list[dict], title: str) -> None:
    """The run's curves as a PNG (matplotlib, Agg): training loss (raw and smoothed) with the held-out loss
    as points above, the learning rate below; ``history`` holds ``metrics.jsonl``'s records."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    def series(key):
        return [(m["step"], m[key]) for m in history if key in m]

    train, held_out, lr = series("loss"), series("eval_loss"), series("lr")
    figure, (loss_axes, lr_axes) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                                gridspec_kw={"height_ratios": [3, 1]})
    if train:
        steps, values = zip(*train, strict=True)
        loss_axes.plot(steps, values, color="C0", alpha=0.3, linewidth=1, label="train loss")
        loss_axes.plot(steps, _smoothed(list(values)), color="C0", linewidth=2, label="train loss (smoothed)")
    if held_out:
        loss_axes.plot(*zip(*held_out, strict=True), "o-", color="C3", label="held-out loss")
    loss_axes.set_ylabel("loss")
    loss_axes.set_title(title)
    loss_axes.grid(alpha=0.3)
    loss_axes.legend()
    if lr:
        lr_axes.plot(*zip(*lr, strict=True), color="C2")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic.write_bytes(path, buffer.getvalue())
