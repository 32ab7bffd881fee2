"""Median wall time of a call, without importing any framework (the torch peer process uses it too)."""

import statistics
import time


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one call that compiles and warms up.
    ``fn`` must return only when its work is done (wait for the device inside it)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
