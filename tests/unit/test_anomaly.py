"""Anomaly detectors: hand-computed baselines and thresholds, then simulator traffic with faults."""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Iterable
from datetime import datetime

import orjson
import pytest

from pipeline.anomaly import (
    Alert,
    AnomalyDetector,
    AnomalyParams,
    BotDetector,
    BotParams,
    ClockSkewMonitor,
    ClockSkewParams,
    DeadLetterMonitor,
    DeadLetterParams,
    Ewma,
    Observation,
    VolumeMonitor,
    VolumeParams,
    volume_sigma,
)
from pipeline.catalog import load_catalog
from pipeline.simulate import RawMessage, SimulationConfig, default_end, simulate

VOL = VolumeParams(
    bucket_ms=1000, alpha=0.5, z_threshold=3, critical_z=6, min_buckets=2, min_volume=5
)


def feed_volume(monitor: VolumeMonitor, counts: Iterable[int], key: str = "page") -> list[Alert]:
    alerts: list[Alert] = []
    for bucket, n in enumerate(counts):
        for i in range(n):
            alerts += monitor.observe(key, "web", bucket * 1000 + i)
    return alerts


def test_ewma_mean_and_variance_by_hand() -> None:
    e = Ewma().update(10, 0.5)
    assert (e.mean, e.var, e.n) == (10, 0, 1)
    e = e.update(20, 0.5)  # diff 10, incr 5: mean 15, var 0.5 * (0 + 10 * 5)
    assert (e.mean, e.var, e.n) == (15, 25, 2)
    e = e.update(15, 0.5)
    assert (e.mean, e.var) == (15, 12.5)


def test_volume_spike_is_judged_against_the_baseline_then_learned_clipped() -> None:
    m = VolumeMonitor(VOL)
    assert feed_volume(m, [10, 10, 30]) == []  # bucket 2 is judged only once it ends
    assert m.baseline("page", "web") == Ewma(10, 0, 2)
    # sigma = sqrt(max(var 0, mean 10)) = 3.162; z = (30 - 10) / 3.162 = 6.32 >= 6: critical
    [alert] = m.advance(3000)
    assert alert == Alert("volume_spike", "page/web", 30, 10, "critical", 3000)
    # learned as 10 + 3 sigma = 19.487: mean 14.743, var 0.5 * (9.487 * 4.743) = 22.5
    base = m.baseline("page", "web")
    assert base.mean == pytest.approx(10 + 1.5 * math.sqrt(10))
    assert base.var == pytest.approx(22.5)


def test_volume_spike_warning_and_the_thresholds_that_silence_it() -> None:
    [alert] = feed_volume(VolumeMonitor(VOL), [10, 10, 20, 1])  # z = 10 / 3.162 = 3.16
    assert (alert.kind, alert.severity, alert.observed) == ("volume_spike", "warning", 20)
    assert feed_volume(VolumeMonitor(VOL), [10, 30, 10]) == []  # bucket 1: still warming up
    # mean 1, sigma floored at 1: 4 is z = 3 but under the minimum volume of 5
    assert feed_volume(VolumeMonitor(VOL), [1, 1, 4, 1]) == []


def test_volume_drop_and_silence() -> None:
    m = VolumeMonitor(VOL)
    feed_volume(m, [10, 10])
    # nothing arrives in bucket 2: z = -10 / 3.162 = -3.16
    assert m.advance(3000) == [Alert("volume_drop", "page/web", 0, 10, "warning", 3000)]
    low = VolumeMonitor(VOL)
    feed_volume(low, [3, 3])
    assert low.advance(3000) == []  # expected 3 < minimum volume 5: a drop there means nothing


def test_volume_silence_is_capped_and_dead_keys_are_forgotten() -> None:
    m = VolumeMonitor(VOL.model_copy(update={"max_gap_buckets": 5}))
    feed_volume(m, [10, 10])
    alerts = m.advance(10**15)  # a clock jump closes at most max_gap_buckets buckets
    assert 1 <= len(alerts) <= 5
    m2 = VolumeMonitor(VOL)
    feed_volume(m2, [1, 1])
    m2.advance(60_000)
    assert m2.baseline("page", "web") == Ewma()


def test_seasonal_slots_learn_alternating_levels() -> None:
    levels = [10, 100] * 8
    seasonal = VolumeMonitor(VOL.model_copy(update={"seasonal_slots": 2}))
    assert feed_volume(seasonal, [*levels, 10]) == []
    assert seasonal.baseline("page", "web", 0) == Ewma(10, 0, 8)
    assert seasonal.baseline("page", "web", 1) == Ewma(100, 0, 8)
    assert volume_sigma(Ewma(0.2, 0, 3)) == 1.0


DL = DeadLetterParams(bucket_ms=1000, alpha=0.5, z_threshold=3, min_jump=0.1, min_volume=10)


def feed_dead(monitor: DeadLetterMonitor, buckets: Iterable[tuple[int, int]]) -> list[Alert]:
    alerts: list[Alert] = []
    for bucket, (total, dead) in enumerate(buckets):
        for i in range(total):
            alerts += monitor.observe("app", i < dead, bucket * 1000 + i)
    return alerts


def test_dead_letter_rate_jump_by_hand() -> None:
    m = DeadLetterMonitor(DL.model_copy(update={"min_buckets": 2}))
    assert feed_dead(m, [(20, 1), (20, 1), (20, 6)]) == []
    assert m.baseline("app") == Ewma(0.05, 0, 2)
    # noise sqrt(0.05 * 0.95 / 20) = 0.0487; threshold max(0.1, 3 * 0.0487) = 0.146
    # rate 0.3 - 0.05 = 0.25 >= 0.146 but < 2 * 0.146: warning
    assert m.advance(3000) == [Alert("dead_letter_rate", "app", 0.3, 0.05, "warning", 3000)]
    critical = DeadLetterMonitor(DL.model_copy(update={"min_buckets": 2}))
    feed_dead(critical, [(20, 1), (20, 1), (20, 8), (1, 0)])
    assert critical.baseline("app").n == 3


def test_dead_letter_small_buckets_and_small_jumps_are_ignored() -> None:
    m = DeadLetterMonitor(DL.model_copy(update={"min_buckets": 2}))
    # 5 messages, all dead: under the minimum volume, neither judged nor learned
    assert feed_dead(m, [(20, 0), (20, 0), (5, 5), (20, 1), (1, 0)]) == []
    assert m.baseline("app").n == 3  # rate 0.05 vs 0: under the minimum jump of 0.1


def test_bot_identity_in_a_sliding_window() -> None:
    bots = BotDetector(BotParams(window_ms=1000, max_events=3, cooldown_ms=5000))
    assert [bots.observe("a", t) for t in (0, 100, 200)] == [[], [], []]
    assert bots.observe("a", 300) == [Alert("bot_identity", "a", 4, 3, "warning", 300)]
    assert bots.observe("a", 400) == []  # cooling down
    steady = BotDetector(BotParams(window_ms=1000, max_events=3))
    assert [a for t in range(0, 5000, 400) for a in steady.observe("h", t)] == []
    eager = BotDetector(BotParams(window_ms=1000, max_events=3, cooldown_ms=0))
    found = [a for t in range(6) for a in eager.observe("b", t)]
    assert [(a.observed, a.severity) for a in found] == [
        (4, "warning"),
        (5, "warning"),
        (6, "critical"),
    ]


def test_bot_detector_forgets_silent_identities() -> None:
    bots = BotDetector(BotParams(window_ms=1000, max_events=3, cooldown_ms=0))
    bots.observe("x", 0)
    bots.observe("y", 10_000)
    assert bots.tracked == 1


def test_clock_skew_median_alerts_once_and_rearms() -> None:
    skew = ClockSkewMonitor(
        ClockSkewParams(threshold_ms=1000, critical_ms=10_000, window=5, min_samples=3)
    )

    def feed(*lags: int) -> list[Alert]:
        return [a for lag in lags for a in skew.observe("s", 50_000 - lag, 50_000)]

    assert feed(10, 20, 30) == []  # median 20
    assert feed(5000, 5000) == []  # medians 25, then 30
    assert feed(-5000) == [Alert("clock_skew", "s", 5000, 1000, "warning", 50_000)]
    assert feed(5000) == []  # still skewed: alerted once
    assert feed(10, 10, 10) == []  # median 10: re-armed
    [alert] = feed(20_000, 20_000, 20_000)
    assert (alert.observed, alert.severity) == (20_000, "critical")
    assert skew.median_ms("s") == 20_000


def test_detector_keeps_dead_letters_out_of_volume_and_bots() -> None:
    det = AnomalyDetector(AnomalyParams(bots=BotParams(window_ms=1000, max_events=1)))
    bad = Observation("invalid", "web", "u1", None, 0, dead_lettered=True)
    assert det.observe(bad) == [] and det.observe(bad) == []
    assert det.bots.tracked == 0
    assert det.dead_letters.advance(0) == []
    ok = Observation("page", "web", "u1", 0, 0)
    assert det.observe(ok) == []
    assert [a.kind for a in det.observe(ok)] == ["bot_identity"]


SOURCES = ("web", "ios", "android", "kiosk")
HOUR_MS = 3_600_000


def observation(msg: RawMessage, *, received_ms: int | None = None) -> Observation:
    """What the stream would observe of a simulated message; its source from its device."""
    identity = msg.key.decode() if msg.key else None
    source = SOURCES[zlib.crc32(msg.key or (msg.message_id or "").encode()) % len(SOURCES)]
    received = msg.delivered_ms if received_ms is None else received_ms
    try:
        event = orjson.loads(msg.value)
    except orjson.JSONDecodeError:
        event = None
    if msg.kind == "malformed" or type(event) is not dict:
        return Observation("invalid", source, identity, None, received, dead_lettered=True)
    kind = f"track:{event['event']}" if event["type"] == "track" else str(event["type"])
    stamp = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
    timestamp = int(stamp.timestamp() * 1000) + received - msg.delivered_ms
    return Observation(kind, source, identity, timestamp, received)


@pytest.fixture(scope="module")
def traffic() -> list[RawMessage]:
    config = SimulationConfig(events=60_000, seed=11, end=default_end())
    return simulate(config, load_catalog()).messages


def run_replayed(observations: Iterable[Observation]) -> list[Alert]:
    """Volume and dead-letter monitors with per-minute buckets; volume warms up for 30 minutes."""
    volume = VolumeMonitor(VolumeParams(bucket_ms=60_000, min_buckets=30, z_threshold=5))
    dead = DeadLetterMonitor(DeadLetterParams(bucket_ms=60_000))
    alerts: list[Alert] = []
    for o in observations:
        alerts += dead.observe(o.source, o.dead_lettered, o.received_ms)
        if not o.dead_lettered:
            alerts += volume.observe(o.event_type, o.source, o.received_ms)
    return alerts


def test_replayed_simulator_traffic_spike_and_broken_source(traffic: list[RawMessage]) -> None:
    """The simulated shop is small: a few sessions can triple a key's hourly volume. Volume is
    therefore judged on the traffic replayed at a constant 20 messages/s, as a load test would."""
    normal = [observation(m, received_ms=i * 50) for i, m in enumerate(traffic)]
    assert run_replayed(normal) == []

    spike_at, broken_at = 40 * 60_000, 30 * 60_000
    faulty: list[Observation] = []
    for o in normal:
        faulty.append(o)
        minute = o.received_ms // 60_000 * 60_000
        if minute == spike_at and (o.event_type, o.source) == ("page", "web"):
            faulty += [o] * 4  # four extra copies of every web page view
        if minute == broken_at and o.source == "android":
            faulty.append(Observation("invalid", "android", None, None, o.received_ms, True))
    alerts = run_replayed(faulty)
    assert {(a.kind, a.subject, a.at_ms) for a in alerts} == {
        ("volume_spike", "page/web", spike_at + 60_000),
        ("dead_letter_rate", "android", broken_at + 60_000),
    }


def test_simulator_traffic_bot_and_skewed_source(traffic: list[RawMessage]) -> None:
    def run(observations: list[Observation]) -> list[Alert]:
        bots, clocks = BotDetector(), ClockSkewMonitor()
        alerts: list[Alert] = []
        for o in observations:
            if o.identity:
                alerts += bots.observe(o.identity, o.received_ms)
            if o.timestamp_ms is not None:
                alerts += clocks.observe(o.source, o.timestamp_ms, o.received_ms)
        return alerts

    normal = [observation(m) for m in traffic]
    assert run(normal) == []

    start = normal[len(normal) // 2].received_ms
    bot = [
        Observation("page", "web", "bot-1", start + i * 200, start + i * 200) for i in range(200)
    ]
    faulty: list[Observation] = []
    for o in sorted(normal + bot, key=lambda o: o.received_ms):
        if o.source == "kiosk" and o.received_ms >= start and o.timestamp_ms is not None:
            # the kiosks' clocks fall two hours behind
            o = dataclasses.replace(o, timestamp_ms=o.timestamp_ms - 2 * HOUR_MS)
        faulty.append(o)
    found = run(faulty)
    assert {(a.kind, a.subject) for a in found} == {
        ("bot_identity", "bot-1"),
        ("clock_skew", "kiosk"),
    }
    [bot_alert] = [a for a in found if a.kind == "bot_identity"]
    assert bot_alert.observed == BotParams().max_events + 1
