"""In-process counters and latency samples of a running processor.

Counters are plain ints updated from the processing thread and read from others (the GIL makes
single increments safe); the demo, tests and later the Prometheus exporter read them.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

LATENCY_SAMPLES = 500_000


@dataclass
class StreamMetrics:
    """What the processor has done since it started."""

    raw_in: int = 0
    valid: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    duplicates_dropped: int = 0
    replays_dropped: int = 0
    identities_linked: int = 0
    identities_merged: int = 0
    events_merged: int = 0
    profile_updates: int = 0
    stitched_in: int = 0
    attributed_out: int = 0
    attributed_in: int = 0
    clean_out: int = 0
    segment_changes: int = 0
    suppressed: int = 0
    events_stored: int = 0
    profiles_stored: int = 0
    dead_letters_stored: int = 0
    # the newest samples only: a long-running processor must not grow with every event
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    first_in_s: float | None = None
    last_stored_s: float | None = None

    def saw_raw(self) -> None:
        self.raw_in += 1
        if self.first_in_s is None:
            self.first_in_s = time.monotonic()

    def stored_events(self, ingested_ms: list[int], stored_ms: int) -> None:
        """Record that events became readable; latency = stored time - broker ingest time."""
        self.events_stored += len(ingested_ms)
        self.latencies_ms.extend(stored_ms - i for i in ingested_ms)
        self.last_stored_s = time.monotonic()

    def latency_percentiles(self) -> dict[str, float]:
        if not self.latencies_ms:
            return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
        p50, p95, p99 = np.percentile(np.asarray(self.latencies_ms), [50, 95, 99])
        return {
            "p50": round(float(p50), 1),
            "p95": round(float(p95), 1),
            "p99": round(float(p99), 1),
        }

    @property
    def dead_lettered_total(self) -> int:
        return sum(self.dead_lettered.values())

    def drained(self, expected_raw: int) -> bool:
        """True when ``expected_raw`` messages went through every stage and every sink."""
        return (
            self.raw_in >= expected_raw
            and self.stitched_in >= self.valid
            and self.attributed_in >= self.attributed_out
            and self.events_stored >= self.clean_out
            and self.profiles_stored >= self.profile_updates
            and self.dead_letters_stored >= self.dead_lettered_total
        )

    def progress(self) -> tuple[int, ...]:
        """A tuple that changes whenever any stage does anything."""
        return (
            self.raw_in,
            self.stitched_in,
            self.attributed_out,
            self.attributed_in,
            self.profile_updates,
            self.events_stored,
            self.profiles_stored,
            self.dead_letters_stored,
        )
