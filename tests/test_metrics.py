"""Run outputs: TensorBoard event files read back with TensorBoard's own reader, metrics.jsonl, the PNG."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qlora_jax.metrics import MetricsWriter, read_metrics, write_loss_plot


def scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    """What TensorBoard shows for ``tag`` in ``run_dir`` (all event files, purges applied)."""
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_tensorboard_reads_the_scalars_and_jsonl_the_records(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(3, {"loss": 1.5, "lr": 0.001})
    writer.write(4, {"loss": 1.25, "lr": 0.001})
    writer.close()
    assert scalars(tmp_path, "loss") == [(3, 1.5), (4, 1.25)]
    assert [(step, round(value, 6)) for step, value in scalars(tmp_path, "lr")] == [(3, 0.001), (4, 0.001)]
    assert read_metrics(tmp_path) == [{"step": 3, "loss": 1.5, "lr": 0.001}, {"step": 4, "loss": 1.25, "lr": 0.001}]


def test_a_resumed_writer_hides_the_points_logged_after_the_checkpoint(tmp_path):
    killed = MetricsWriter(tmp_path)
    for step in range(1, 7):  # the killed run logged steps 1-6; its checkpoint is step 4
        killed.write(step, {"loss": float(step)})
    killed.close()
    resumed = MetricsWriter(tmp_path, purge_step=5)
    for step in range(5, 9):
        resumed.write(step, {"loss": 10.0 + step})
    resumed.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert scalars(tmp_path, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 15.0), (6, 16.0), (7, 17.0),
                                         (8, 18.0)]


def test_loss_plot_has_title_axes_smoothed_train_line_and_held_out_points(tmp_path):
    from matplotlib import image

    history = [{"step": 0, "eval_loss": 3.2}] + [{"step": s, "loss": 3.0 - 0.1 * s + 0.05 * (s % 2), "lr": 1e-4}
                                                  for s in range(1, 21)] + [{"step": 20, "eval_loss": 2.1}]
    path = tmp_path / "curve.png"
    write_loss_plot(path, history, "run: model, nf4+dq, LoRA r=16")
    pixels = image.imread(path)  # matplotlib's own PNG reader
    assert pixels.shape[:2] == (600, 800)
    rgb = (pixels[..., :3] * 255).round().astype(int).reshape(-1, 3)
    colours = {tuple(c) for c in rgb}
    assert (31, 119, 180) in colours  # C0: the smoothed train line
    assert (214, 39, 40) in colours  # C3: the held-out points
    assert (44, 160, 44) in colours  # C2: the learning rate panel


def test_smoothing_is_tensorboards():
    from qlora_jax.metrics import _smoothed

    assert _smoothed([1.0]) == [1.0]  # bias-corrected: the first point is itself
    assert _smoothed([1.0, 3.0]) == pytest.approx([1.0, 1.0 + 2.0 * 0.4 / (1 - 0.36)])
