"""Run metrics: JSON Lines, TensorBoard event files (tensorboardX) and a loss-curve PNG (drawn here).

A resumed run drops what the killed run logged after its checkpoint: ``metrics.jsonl``
is truncated, and the new TensorBoard event file starts with a ``SessionLog.START`` at
the first step after the checkpoint (``purge_step``), which makes TensorBoard discard the
points of earlier event files from that step on (its "out of order step" purge), so each
step is shown once.
"""

import json
import struct
import time
import zlib
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


# A 3x5 pixel font for axis labels.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111111100111", "s": "000111110011111", "t": "010111010010011", "p": "000111101111100",
    "l": "100100100100111", "o": "000111101101111", "r": "000111100100100", "a": "000111011101111",
    "i": "010000010010010", "n": "000110101101101", "v": "000101101101010", " ": "000000000000000",
}


def write_loss_png(path: Path, series: dict[str, list[tuple[int, float]]], width: int = 640,
                   height: int = 400) -> None:
    """Plot ``{"train": [(step, loss), ...], "eval": [...]}`` as lines on a white PNG with axis ranges."""
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44)]
    pixels = [[(255, 255, 255)] * width for _ in range(height)]
    left, right, top, bottom = 60, width - 20, 20, height - 40
    points = [p for s in series.values() for p in s]
    if not points:
        return
    x_min, x_max = min(p[0] for p in points), max(p[0] for p in points)
    y_min, y_max = min(p[1] for p in points), max(p[1] for p in points)
    x_span, y_span = max(x_max - x_min, 1), max(y_max - y_min, 1e-9)

    def put(x, y, color):
        if 0 <= x < width and 0 <= y < height:
            pixels[y][x] = color

    def line(x0, y0, x1, y1, color):
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            put(round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps), color)

    def text(x, y, label, color=(0, 0, 0)):
        for char in label:
            glyph = _GLYPHS.get(char, _GLYPHS[" "])
            for row in range(5):
                for col in range(3):
                    if glyph[row * 3 + col] == "1":
                        for dy in range(2):
                            for dx in range(2):
                                put(x + 2 * col + dx, y + 2 * row + dy, color)
            x += 8

    line(left, bottom, right, bottom, (0, 0, 0))
    line(left, top, left, bottom, (0, 0, 0))
    text(2, top, f"{y_max:.3g}")
    text(2, bottom - 10, f"{y_min:.3g}")
    text(left, bottom + 8, f"{x_min}")
    text(right - 40, bottom + 8, f"{x_max}")
    for index, (name, data) in enumerate(series.items()):
        color = colors[index % len(colors)]
        text(left + 20 + 80 * index, bottom + 24, name, color)
        coords = [(left + round((s - x_min) / x_span * (right - left)),
                   bottom - round((v - y_min) / y_span * (bottom - top))) for s, v in data]
        for (x0, y0), (x1, y1) in zip(coords, coords[1:], strict=False):
            line(x0, y0, x1, y1, color)
        for x, y in coords:
            put(x, y, color)
    raw = b"".join(b"\x00" + bytes(c for pixel in row for c in pixel) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    atomic.write_bytes(path, png)
