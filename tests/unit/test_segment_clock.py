"""The trigger scan's segment clock: which customers it ticks, and how often it looks."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson

from pipeline.scoring import ScoringParams
from pipeline.segments import load_segments
from pipeline.stores.local import LocalWarehouse
from pipeline.stream.stages import KIND_EVENT, KIND_TICK, StageConfig, fold
from pipeline.stream.trigger_scan import SegmentClock
from pipeline.testing import T0_MS, MemoryState, make_event

DAY = 86_400_000
CONFIG = StageConfig(
    dedupe_window=timedelta(hours=24),
    history_limit=10,
    scoring=ScoringParams(),
    segments=tuple(load_segments()),
)


class Recorder:
    """Keeps what would be produced (the scan's producer, as far as the clock uses it)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict[str, Any]]] = []

    def produce(self, topic: str, key: bytes, value: bytes) -> None:
        self.sent.append((topic, key, orjson.loads(value)))

    def flush(self, timeout: float) -> int:
        return 0


def _profile(customer: str, ts: int) -> dict[str, Any]:
    event = make_event(ts=ts, customer_id=customer, user_id=customer)
    record = {**event.to_dict(), "kind": KIND_EVENT}
    out = fold(record, MemoryState({}, customer), CONFIG, now_ms=ts)
    return out[1]


def test_the_clock_ticks_whom_time_moves_and_looks_at_most_once_per_interval(
    tmp_path: Path,
) -> None:
    wall = [0]
    recorder = Recorder()
    with LocalWarehouse(tmp_path / "w.db") as wh:
        # quiet for 40 days, and active at the watermark
        wh.write_profiles([_profile("quiet", T0_MS), _profile("active", T0_MS + 40 * DAY)])
        wh.write_events([make_event(ts=T0_MS + 40 * DAY, customer_id="active").to_dict()])
        clock = SegmentClock(
            wh, recorder, "events.attributed", CONFIG, 5 * 60_000, wall_ms=lambda: wall[0]
        )  # type: ignore[arg-type]
        assert clock.tick() == 1
        [(topic, key, tick)] = recorder.sent
        assert (topic, key) == ("events.attributed", b"quiet")
        assert tick == {"kind": KIND_TICK, "customer_id": "quiet", "at_ms": T0_MS + 40 * DAY}
        wh.write_events([make_event(ts=T0_MS + 41 * DAY, customer_id="active").to_dict()])
        assert clock.tick() == 0  # the watermark moved a day, but no wall-clock time passed
        wall[0] += 5 * 60_000
        assert clock.tick() == 1  # (quiet has not been ticked in the store: still due)
        assert clock.tick() == 0
