"""What the benchmark scripts share: random-weight model shapes, and a report written as it grows.

Models: the presets of ``qlora_jax.memory`` (Hugging Face configs of the original
checkpoints: ``tinyllama-1.1b``, ``llama-7b``, ...) built with random weights, so a GPU
machine without a model hub can run them, plus ``tiny``: 2 layers of width 64, for the
CPU rehearsal of ``scripts/gpu_check.sh`` (``tests/test_gpu_check.py``).
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import timing

from qlora_jax.config import ModelConfig
from qlora_jax.memory import PRESETS

RANDOM_MODELS = {**PRESETS, "tiny": ModelConfig("llama", 512, 64, 128, 2, 4, 2, 16)}


class Report:
    """Lines printed and appended to ``out`` (markdown) one by one, so a run cut short keeps what it measured."""

    def __init__(self, out: Path | None):
        self.out = out
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("")

    def __call__(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
            if self.out:
                with self.out.open("a") as file:
                    file.write(line + "\n")


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` (results waited for), after one call that compiles and warms up."""
    return timing.median_seconds(lambda: jax.block_until_ready(fn()), repeats)


def int_list(text: str) -> tuple[int, ...]:
    """``"1,16,512"`` -> ``(1, 16, 512)`` (argparse type)."""
    return tuple(int(v) for v in text.split(","))


def fail(message: str) -> int:
    """The scripts' bad-input exit: one ``error:`` line on stderr, status 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


class Peer:
    """``scripts/peer_worker.py`` in its own process: transformers timings on request."""

    def __init__(self, model_dir: Path):
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("peer_worker.py")),
                                         str(model_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.process.stdout.readline())

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
