"""Anomaly detectors: hand-computed baselines and thresholds, then simulator traffic with faults."""

from __future__ import annotations

import dataclasses
import math
import statistics
import zlib
from collections.abc import Iterable
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

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
    bucket_ms=1000,
    alpha=0.5,
    z_threshold=3,
    critical_z=6,
    min_buckets=2,
    min_volume=5,
    dispersion=1,  # Poisson, as the arithmetic below is written
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


def test_dispersion_widens_the_spread_above_the_baseline_only() -> None:
    """Sessions burst within a minute: a spike is judged against ``dispersion`` times the
    Poisson variance; a drop still against Poisson's (a minute with no session is rare)."""
    assert volume_sigma(Ewma(10, 0, 2), 3.0) == pytest.approx(math.sqrt(30))
    assert volume_sigma(Ewma(10, 50, 2), 3.0) == pytest.approx(math.sqrt(50))  # learned wins
    bursty = VOL.model_copy(update={"dispersion": 3.0})
    # z = 10 / sqrt(30) = 1.83: not a spike (with Poisson it is 3.16, a warning)
    assert feed_volume(VolumeMonitor(bursty), [10, 10, 20, 1]) == []
    # 20 / sqrt(30) = 3.65: a spike still
    [spike] = feed_volume(VolumeMonitor(bursty), [10, 10, 30, 1])
    assert (spike.kind, spike.severity) == ("volume_spike", "warning")
    # nothing in bucket 2: z = -10 / sqrt(10) = -3.16, as without dispersion
    m = VolumeMonitor(bursty)
    feed_volume(m, [10, 10])
    assert m.advance(3000) == [Alert("volume_drop", "page/web", 0, 10, "warning", 3000)]


def test_volume_drop_and_silence() -> None:
    m = VolumeMonitor(VOL)
    feed_volume(m, [10, 10])
    # nothing arrives in bucket 2: z = -10 / 3.162 = -3.16
    assert m.advance(3000) == [Alert("volume_drop", "page/web", 0, 10, "warning", 3000)]
    low = VolumeMonitor(VOL)
    feed_volume(low, [3, 3])
    assert low.advance(3000) == []  # expected 3 < minimum volume 5: a drop there means nothing


def test_a_source_that_stops_is_reported_silent_once_and_stays_expected() -> None:
    """Before, a stopped source drew a few drop alerts, then its baseline learned the zeros
    and it went quiet, and its return read as a spike."""
    params = VOL.model_copy(update={"silent_buckets": 3, "silent_forget_buckets": 50})
    m = VolumeMonitor(params)
    feed_volume(m, [10] * 6)
    drops = [m.advance(7000), m.advance(8000)]  # buckets 6 and 7: nothing
    assert [[a.kind for a in b] for b in drops] == [["volume_drop"], ["volume_drop"]]
    expected = m.baseline("page", "web")
    [silent] = m.advance(9000)
    assert silent == Alert("source_silent", "page/web", 0.0, expected.mean, "critical", 9000)
    assert m.advance(30_000) == []  # once, not every minute of the silence
    assert m.baseline("page", "web") == expected  # the zeros are not learned
    # it comes back as before: nothing to report, nothing to learn from the silence
    back = [m.observe("page", "web", 30_000 + i) for i in range(10)]
    assert [a for b in back for a in b] == [] and m.advance(31_000) == []
    # a source that stays away is forgotten in the end (decommissioned)
    gone = VolumeMonitor(params)
    feed_volume(gone, [10] * 6)
    gone.advance(100_000)  # at most max_gap_buckets (60) closed: silent for 57, over 50
    assert gone.baseline("page", "web") == Ewma()


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


@given(
    lags=st.lists(st.integers(-(10**7), 10**7), min_size=1, max_size=60),
    window=st.integers(1, 9),
)
def test_the_skew_median_is_the_median_of_the_last_window_events(
    lags: list[int], window: int
) -> None:
    skew = ClockSkewMonitor(ClockSkewParams(window=window, min_samples=1))
    for i, lag in enumerate(lags):
        skew.observe("s", 10**8 - lag, 10**8)
        assert skew.median_ms("s") == statistics.median(abs(x) for x in lags[: i + 1][-window:])


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


def test_observation_of_clean_events_and_dead_letters() -> None:
    from pipeline.anomaly import UNKNOWN_SOURCE, observation_of
    from pipeline.events import CleanEvent, Failure

    event = CleanEvent("m1", "track", "Product Viewed", 1_000, 2_000, "a1", "u1", source="web")
    assert observation_of(event, 5_000) == Observation("Product Viewed", "web", "u1", 1_000, 5_000)
    anonymous = CleanEvent("m2", "page", "Page Viewed", 1_000, 2_000, anonymous_id="a1")
    assert observation_of(anonymous, 5_000) == Observation(
        "Page Viewed", UNKNOWN_SOURCE, "a1", 1_000, 5_000
    )
    failure = Failure.of("schema_violation", "x", b"{}", event_name="Product Viewed", source="k")
    assert observation_of(failure, 7) == Observation("Product Viewed", "k", None, None, 7, True)
    unreadable = Failure.of("not_json", "x", b"{")
    assert observation_of(unreadable, 7) == Observation("invalid", "unknown", None, None, 7, True)


def test_a_record_stamped_in_the_future_counts_as_received_now_and_detection_goes_on() -> None:
    """One record whose producer's clock runs a year ahead must not carry the partition's
    bucket clock there: every later bucket would count into one that never closes."""
    from pipeline.anomaly import AnomalyDetector, AnomalyParams, observation_of
    from pipeline.events import CleanEvent

    minute = 60_000
    params = AnomalyParams(volume=VolumeParams(bucket_ms=minute, min_buckets=3))
    detector = AnomalyDetector(params)

    def views(n: int, at_ms: int) -> list[Alert]:
        out: list[Alert] = []
        for i in range(n):
            event = CleanEvent(f"m{at_ms}-{i}", "track", "Product Viewed", at_ms, at_ms, "a1")
            out += detector.observe(observation_of(event, at_ms, now_ms=at_ms))
        return out

    for b in range(10):
        assert views(20, b * minute) == []
    ahead = CleanEvent("late", "track", "Product Viewed", 10 * minute, 10 * minute, "a1")
    year = 365 * 24 * 60 * minute
    assert observation_of(ahead, year, now_ms=10 * minute).received_ms == 10 * minute
    detector.observe(observation_of(ahead, year, now_ms=10 * minute))
    views(200, 10 * minute + 1)  # a tenfold spike in the same minute
    alerts = views(20, 11 * minute)  # the next minute closes it
    assert [a.kind for a in alerts] == ["volume_spike"]


def test_a_partition_back_from_another_replica_is_not_judged_for_the_time_away() -> None:
    """Steady traffic all along, but this replica read the partition's first hour, then
    another replica read it for three hours (a rebalance), then this one again. The jump in
    offsets says the gap was not silence; a real outage (no jump) still is a drop."""
    from collections import Counter

    from pipeline.anomaly import PartitionedDetector

    minute, per_minute = 60_000, 50

    def feed(det: PartitionedDetector, first: int, last: int, offset: int | None) -> list[Alert]:
        """Steady minutes ``first`` to ``last``; offsets from ``offset`` on (None: unknown)."""
        out: list[Alert] = []
        for n, (b, i) in enumerate((b, i) for b in range(first, last) for i in range(per_minute)):
            t = b * minute + i * (minute // per_minute)
            obs = Observation("Product Viewed", "web", f"u{i}", t, t)
            out += det.observe(0, obs, None if offset is None else offset + n)
        return out

    moved = PartitionedDetector()
    assert feed(moved, 0, 60, 0) == []
    assert feed(moved, 240, 300, 12_000) == []  # offsets 3,000 .. 11,999 were not ours

    blind = PartitionedDetector()  # without offsets the time away reads as silence
    feed(blind, 0, 60, None)
    kinds = Counter(a.kind for a in feed(blind, 240, 300, None))
    assert kinds["volume_drop"] >= 1

    outage = PartitionedDetector()  # nothing arrived anywhere: the offsets run on
    feed(outage, 0, 60, 0)
    assert any(a.kind == "volume_drop" for a in feed(outage, 240, 241, 3_000))


def test_alert_ids_are_deterministic_and_records_carry_them() -> None:
    from pipeline.anomaly import alert_id, alert_record

    alert = Alert("volume_spike", "page/web", 30, 10, "critical", 3000)
    assert alert_id("volume_spike", "page/web", 3000) == alert_id("volume_spike", "page/web", 3000)
    assert len({alert_id(*k) for k in [("a", "b", 1), ("a", "b", 2), ("a", "c", 1)]}) == 3
    record = alert_record(alert, partition=2)
    assert record == {
        "alert_id": alert_id("volume_spike", "page/web", 3000),
        "alert_kind": "volume_spike",
        "subject": "page/web",
        "severity": "critical",
        "observed": 30,
        "expected": 10,
        "at_ms": 3000,
        "partition": 2,
    }


def test_partitions_keep_their_own_clock_and_baselines() -> None:
    """A partition read hours ahead of another (a backlog) does not close the other's buckets."""
    from pipeline.anomaly import PartitionedDetector

    params = AnomalyParams(volume=VOL)
    # ten a second for three seconds per partition; partition 0 is read first, then 1
    backlog = [
        (p, Observation("page", "web", f"{p}-{i}", None, bucket * 1000 + i))
        for p in range(2)
        for bucket in range(3)
        for i in range(10)
    ]
    det = PartitionedDetector(params)
    assert [a for p, o in backlog for a in det.observe(p, o)] == []
    assert det.detector(0).volume.baseline("page", "web") == Ewma(10, 0, 2)
    assert det.detector(1).volume.baseline("page", "web") == Ewma(10, 0, 2)
    assert det.advance(3000) == []
    merged = AnomalyDetector(params)  # one detector on the same order: partition 1 looks late
    for _, o in backlog:
        merged.observe(o)
    assert [a.kind for a in merged.advance(3000)] == ["volume_spike"]


def test_one_dead_letter_on_a_clean_baseline_is_noise() -> None:
    m = DeadLetterMonitor(DL.model_copy(update={"min_buckets": 2, "min_jump": 0.01}))
    # baseline 0: one dead letter in 20 (5%) is under 3 spreads of one-per-bucket noise (14.6%)
    [alert] = feed_dead(m, [(20, 0), (20, 0), (20, 1), (20, 2), (20, 6), (1, 0)])
    assert (alert.observed, alert.at_ms) == (0.3, 5000)  # 1 and 2 of 20 were not alerted


def test_clock_skew_repeats_while_it_lasts() -> None:
    skew = ClockSkewMonitor(
        ClockSkewParams(threshold_ms=1000, window=3, min_samples=1, repeat_ms=10_000)
    )
    found = [a.at_ms for t in range(0, 25_000, 1000) for a in skew.observe("s", t - 5000, t)]
    assert found == [0, 10_000, 20_000]


def test_anomaly_params_nest_in_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.settings import Settings

    monkeypatch.setenv("PIPELINE_ANOMALY__BOTS__MAX_EVENTS", "90")
    settings = Settings(_env_file=None)
    assert settings.anomaly.bots.max_events == 90
    assert settings.anomaly.volume == VolumeParams()
    assert settings.topics.alerts in settings.topics.all()


@pytest.fixture(scope="module")
def busy_days() -> list[RawMessage]:
    """Two dense simulated days (about 40 messages a minute), cut where the shop closes: a
    seed whose bursts of sessions Poisson's spread takes for spikes at one partition."""
    end = datetime(2026, 11, 1, tzinfo=UTC)
    sim = simulate(SimulationConfig(events=120_000, seed=2, end=end, days=2), load_catalog())
    return [m for m in sim.messages if m.delivered_ms <= end.timestamp() * 1000]


def _detected(
    messages: list[RawMessage], partitions: int, params: AnomalyParams | None = None
) -> list[Alert]:
    """The stream's path (parse, observation, per-partition detectors), partitioned by key
    (CRC32 here)."""
    from pipeline.anomaly import PartitionedDetector, observation_of
    from pipeline.parsing import ParseLimits, parse_event
    from pipeline.schemas import default_registry

    registry, limits = default_registry(), ParseLimits()
    now = messages[-1].delivered_ms
    det = PartitionedDetector(params)
    alerts = []
    for offset, m in enumerate(messages):
        parsed = parse_event(
            m.value, registry=registry, limits=limits, now_ms=now, ingested_ms=m.delivered_ms
        )
        partition = zlib.crc32(m.key) % partitions if m.key else offset % partitions
        alerts += det.observe(partition, observation_of(parsed, m.delivered_ms))
    return alerts


@pytest.mark.parametrize("partitions", [1, 4])
def test_clean_simulated_traffic_raises_no_alert_per_partition(
    busy_days: list[RawMessage], partitions: int
) -> None:
    """Ordinary traffic with the default parameters: not one alert, with one detector seeing
    it all (the default) or four a quarter each."""
    assert _detected(busy_days, partitions) == []


def test_judged_with_poissons_spread_the_same_traffic_has_false_spikes(
    busy_days: list[RawMessage],
) -> None:
    """What the spikes' dispersion is for: at one partition these two days' bursts of
    sessions are spikes to Poisson's spread."""
    poisson = AnomalyParams(volume=VolumeParams(dispersion=1.0))
    false = _detected(busy_days, 1, poisson)
    assert false and {a.kind for a in false} == {"volume_spike"}


def test_a_backfill_arrives_fast_but_is_not_a_bot() -> None:
    bots = BotDetector(BotParams(window_ms=1000, max_events=3, cooldown_ms=5000))
    # four events within 40 ms of arrival that happened an hour apart: history, replayed
    assert [a for i in range(4) for a in bots.observe("h", i * 10, i * HOUR_MS)] == []
    # four that also happened within the window: a bot
    [alert] = [a for i in range(4) for a in bots.observe("b", i * 10, 5_000 + i * 100)]
    assert (alert.subject, alert.observed) == ("b", 4)


def test_a_bucket_watched_only_in_part_is_neither_judged_nor_learned() -> None:
    """Steady 300 a minute. A detector started a second before a minute ends counts 5 in it:
    learned as the first baseline value, it kept a fall to 100 at minute 11 unseen. Resumed
    (resync) ten seconds before a minute ends, that minute's 50 read as a critical drop."""
    from pipeline.anomaly import PartitionedDetector

    minute, per_minute = 60_000, 300

    def steady(monitor: VolumeMonitor, start_ms: int, end_ms: int, low: int = -1) -> list[Alert]:
        out: list[Alert] = []
        for t in range(start_ms, end_ms, minute // per_minute):
            if t // minute != low or t % minute < minute // 3:  # a third in minute ``low``
                out += monitor.observe("page", "web", t)
        return out

    late = VolumeMonitor()
    assert steady(late, 59_000, 11 * minute) == []
    assert late.baseline("page", "web").mean == per_minute  # the 5 of minute 0 not learned
    [drop] = steady(late, 11 * minute, 13 * minute, low=11)
    assert (drop.kind, drop.observed, drop.at_ms) == ("volume_drop", 100, 12 * minute)

    det = PartitionedDetector()
    for n, t in enumerate(range(0, 60 * minute, minute // per_minute)):
        assert det.observe(0, Observation("page", "web", None, t, t), n) == []
    resumed = 240 * minute + 50_000  # another replica read the partition meanwhile
    for n, t in enumerate(range(resumed, 300 * minute, minute // per_minute)):
        assert det.observe(0, Observation("page", "web", None, t, t), 100_000 + n) == []
