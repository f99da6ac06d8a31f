"""Python's cyclic garbage collector in the processor: its pauses measured, and tuned for a
stream loop.

The processing loop allocates many short-lived containers per event (records, a profile's dicts)
beside long-lived objects made once at start (modules, quixstreams, the catalog, the rules).
With CPython's default thresholds (700, 10, 10) a young collection runs every few events and,
every hundred of those, a full collection walks every long-lived object again. In the bench's
process (about 300,000 tracked objects) that was nine full collections, 1.9 s in all and the
longest 234-248 ms (two runs), over a 50,000-event backlog and its paced phases: the loop stops
for each, so every event in flight waits. :func:`tuned_for_streaming` freezes what exists once
the processor is built (``gc.freeze``: those objects are never examined again) and raises the
thresholds, so full collections become rare and young ones fewer. Garbage is still freed by
reference counting the moment it is unreferenced; only cycles wait longer.

The collector's and the API's HTTP servers do the same once they have started (a request
waits out a pause as an event does), and count their pauses for their own ``/metrics``.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import threading
import time
from collections.abc import Iterator
from typing import Any

GC_BUCKETS_S: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Upper bounds of the pause histogram (``pipeline_gc_pause_seconds``), in seconds."""
GENERATIONS = (0, 1, 2)

# generation 1 and 2 thresholds beside a raised young one: at most one full collection per
# 20 x 100 young collections (and, CPython's own rule, none before the long-lived objects grew
# by a quarter since the last one)
_OLDER_THRESHOLDS = (20, 100)


class GcPauses:
    """Pauses of this process's cyclic garbage collector per generation, recorded through
    ``gc.callbacks`` while :meth:`tracking` is active: counts, seconds, the longest, and a
    histogram over :data:`GC_BUCKETS_S`.

    Collections do not overlap (CPython runs one at a time), so one start time suffices; the
    figures are plain numbers read by other threads, as the stream's counters are.
    """

    def __init__(self) -> None:
        self.counts = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest_s = [0.0, 0.0, 0.0]
        self.buckets = [[0] * (len(GC_BUCKETS_S) + 1) for _ in GENERATIONS]  # +Inf last
        self._window_longest_s = 0.0
        self._started = 0.0

    def record(self, generation: int, pause_s: float) -> None:
        """Count one collection of ``generation`` that took ``pause_s`` seconds."""
        self.counts[generation] += 1
        self.seconds[generation] += pause_s
        self.longest_s[generation] = max(self.longest_s[generation], pause_s)
        self._window_longest_s = max(self._window_longest_s, pause_s)
        self.buckets[generation][bisect.bisect_left(GC_BUCKETS_S, pause_s)] += 1

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.record(int(info["generation"]), time.perf_counter() - self._started)

    @contextlib.contextmanager
    def tracking(self) -> Iterator[GcPauses]:
        """Record this process's collections while the block runs."""
        gc.callbacks.append(self._on_gc)
        try:
            yield self
        finally:
            with contextlib.suppress(ValueError):
                gc.callbacks.remove(self._on_gc)

    def total(self) -> tuple[int, float]:
        """``(collections, seconds)`` over every generation so far."""
        return sum(self.counts), sum(self.seconds)

    def take_longest_s(self) -> float:
        """The longest pause since the previous call (or since tracking began), and start a
        new window: the bench's per-phase figure."""
        longest, self._window_longest_s = self._window_longest_s, 0.0
        return longest


_tuning_lock = threading.RLock()  # re-entered by such a finalizer if a collection runs inside
_tuned_by = 0  # processing loops in this process inside tuned_for_streaming
_untuned_threshold: tuple[int, int, int] = gc.get_threshold()


@contextlib.contextmanager
def tuned_for_streaming(young_threshold: int) -> Iterator[None]:
    """While the block runs: objects alive now frozen out of the collector's reach and its
    thresholds raised to ``(young_threshold, 20, 100)``; both restored afterwards, so that a
    notebook kernel that ran the processor gets its collector back as it was. ``0`` leaves the
    collector alone.

    Garbage left over from start-up is collected first, so that it is not frozen with the rest.
    Loops that overlap in one process (``pipeline up``'s servers and processor, tests) share
    the thresholds: the first to start sets them, the last to end restores what was there
    before the first. Each one's start freezes what was built since (the processor, built
    while the collector already serves), at the cost of one collection then.
    """
    global _tuned_by, _untuned_threshold
    if young_threshold <= 0:
        yield
        return
    # outside the lock: a collection runs finalizers, and one of an abandoned tuning block
    # (a generator left at its yield) takes the lock to end its tuning
    gc.collect()
    with _tuning_lock:
        if _tuned_by == 0:
            _untuned_threshold = gc.get_threshold()
            gc.set_threshold(young_threshold, *_OLDER_THRESHOLDS)
        gc.freeze()
        _tuned_by += 1
    try:
        yield
    finally:
        with _tuning_lock:
            _tuned_by -= 1
            if _tuned_by == 0:
                gc.set_threshold(*_untuned_threshold)
                gc.unfreeze()


@contextlib.contextmanager
def tuned_and_counted(pauses: GcPauses, young_threshold: int) -> Iterator[None]:
    """Around a processing loop or a server's life once it has started: the collector tuned
    for it (:func:`tuned_for_streaming`) and its pauses recorded in ``pauses``."""
    # tuned first: its collection of the start-up garbage is not a pause of the loop
    with tuned_for_streaming(young_threshold), pauses.tracking():
        yield
