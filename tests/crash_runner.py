"""``python -m qlora_jax.train`` that dies at a chosen point; driven by tests/test_reliability.py.

    python tests/crash_runner.py POINT COUNT TRAIN_ARGS...

POINT:
  step     SIGKILL right after the COUNT-th training step of this process returns
  save     SIGKILL inside the COUNT-th checkpoint save: orbax has written the step's files
           into its temporary directory and has not renamed it into place
  export   SIGKILL inside the final adapter export, after its tensors are written
  convert  SIGKILL inside the first-use conversion of the built-in GGUF model, after model.safetensors
  sigterm  send SIGTERM to ourselves after the COUNT-th step (the run should save and exit)
  sigint   the same with SIGINT (Ctrl-C)
  none     run normally
"""

import os
import signal
import sys

from orbax.checkpoint._src.handlers.composite_checkpoint_handler import CompositeCheckpointHandler

from qlora_jax import gguf_import, peft, train


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _After:
    """Calls ``fn``, then ``action`` once the COUNT-th call has returned; other attributes go to ``fn``."""

    def __init__(self, fn, count: int, action, before: bool = False):
        self.fn, self.count, self.action, self.before, self.calls = fn, count, action, before, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.before and self.calls == self.count:
            self.action()
        result = self.fn(*args, **kwargs)
        if not self.before and self.calls == self.count:
            self.action()
        return result

    def __getattr__(self, name):
        return getattr(self.fn, name)


def main() -> int:
    point, count, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    make_train_step = train.make_train_step
    if point == "step":
        train.make_train_step = lambda *a, **k: _After(make_train_step(*a, **k), count, _kill)
    elif point == "save":
        finalize = _After(CompositeCheckpointHandler.finalize, count, _kill, before=True)
        CompositeCheckpointHandler.finalize = lambda self, directory: finalize(self, directory)
    elif point == "export":
        peft.save_file = _After(peft.save_file, count, _kill)
    elif point == "convert":
        gguf_import.save_streaming = _After(gguf_import.save_streaming, count, _kill)
    elif point in ("sigterm", "sigint"):
        signum = signal.SIGTERM if point == "sigterm" else signal.SIGINT
        train.make_train_step = lambda *a, **k: _After(make_train_step(*a, **k), count,
                                                       lambda: os.kill(os.getpid(), signum))
    elif point != "none":
        raise SystemExit(f"unknown crash point {point!r}")
    return train.main(args)


if __name__ == "__main__":
    sys.exit(main())
