"""Run outputs written without extra dependencies: TensorBoard records, metrics.jsonl, the PNG."""

import struct
import zlib

from qlora_jax.metrics import MetricsWriter, _masked_crc, crc32c, read_metrics, write_loss_png


def test_crc32c_known_value():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def test_event_file_records_have_valid_crcs_and_scalars(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(3, {"loss": 1.5, "lr": 0.001})
    writer.close()
    [events] = tmp_path.glob("events.out.tfevents.*")
    data, records = events.read_bytes(), []
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        assert struct.unpack("<I", data[8:12])[0] == _masked_crc(data[:8])
        payload = data[12:12 + length]
        assert struct.unpack("<I", data[12 + length:16 + length])[0] == _masked_crc(payload)
        records.append(payload)
        data = data[16 + length:]
    assert len(records) == 2 and b"brain.Event:2" in records[0]
    assert b"loss" in records[1] and struct.pack("<f", 1.5) in records[1]
    assert read_metrics(tmp_path) == [{"step": 3, "loss": 1.5, "lr": 0.001}]


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
