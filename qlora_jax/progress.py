"""Training progress for a person watching: a tqdm bar on a terminal, plain lines anywhere else.

When stderr is not a terminal (a log file, CI, ``nohup``) tqdm hides itself, so a run would
print nothing between evaluations. ``PlainProgress`` prints one line to stdout, with the
rest of the log (step, loss, learning rate, tokens/s, ETA), every ``every`` steps or every
``seconds``, whichever comes first; stderr keeps only errors.
Both start timing after the first step, so the ETA never counts the compilation.
"""

import sys
import time

from tqdm import tqdm


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class PlainProgress:
    """``update(done, values)`` after each step ``done`` (1-based); ``write(line)`` for other messages."""

    def __init__(self, first: int, total: int, every: int, seconds: float = 30.0, out=None,
                 clock=time.perf_counter):
        self.first, self.total, self.every, self.seconds = first, total, max(every, 1), seconds
        self.out, self.clock = out or sys.stdout, clock
        self.started = self.last_time = clock()
        self.last_step = first

    def update(self, done: int, values: dict) -> None:
        now = self.clock()
        if done - self.last_step < self.every and now - self.last_time < self.seconds and done < self.total:
            return
        rate = (now - self.started) / max(done - self.first, 1)  # seconds per step since timing began
        parts = [f"step {done}/{self.total}"]
        if "loss" in values:
            parts += [f"loss {values['loss']:.4f}", f"lr {values['lr']:.2e}", f"{values['tokens_per_s']:.0f} tok/s"]
        parts.append(f"ETA {_duration(rate * (self.total - done))}")
        self.write(", ".join(parts))
        self.last_step, self.last_time = done, now

    def write(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def close(self) -> None:
        pass


class BarProgress:
    """A tqdm bar over the remaining steps (its rate and ETA start after the first step)."""

    def __init__(self, first: int, total: int):
        self.bar = tqdm(total=total, initial=first, desc="train", dynamic_ncols=True)

    def update(self, done: int, values: dict) -> None:
        self.bar.update(done - self.bar.n)
        if "loss" in values:
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                                 tok_s=f"{values['tokens_per_s']:.0f}")

    def write(self, line: str) -> None:
        self.bar.write(line)

    def close(self) -> None:
        self.bar.close()


class NoProgress:
    """What hosts other than the primary report: nothing."""

    def update(self, done: int, values: dict) -> None:
        pass

    def write(self, line: str) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(first: int, total: int, every: int, enabled: bool):
    """A bar on a terminal, plain lines otherwise, nothing when ``enabled`` is false (non-primary hosts)."""
    if not enabled:
        return NoProgress()
    return BarProgress(first, total) if sys.stderr.isatty() else PlainProgress(first, total, every)
