"""Run outputs: TensorBoard event files read back with TensorBoard's own reader, metrics.jsonl, the PNG."""

import struct
import zlib

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qlora_jax.metrics import MetricsWriter, read_metrics, write_loss_png


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


def test_loss_png_is_a_valid_png(tmp_path):
    path = tmp_path / "curve.png"
    write_loss_png(path, {"train": [(1, 3.0), (2, 2.5), (3, 2.0)], "eval": [(0, 3.2), (3, 2.2)]}, 120, 80)
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", raw[16:24])
    assert (width, height) == (120, 80)
    idat = raw.index(b"IDAT")
    (length,) = struct.unpack(">I", raw[idat - 4:idat])
    pixels = zlib.decompress(raw[idat + 4:idat + 4 + length])
    assert len(pixels) == 80 * (1 + 120 * 3)
    assert pixels.count(bytes([31, 119, 180])) > 10  # the train line is drawn
