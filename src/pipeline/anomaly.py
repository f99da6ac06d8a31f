"""Anomaly detection on incoming traffic: pure, online detectors that turn observations into alerts.

Each detector is fed in arrival order and keeps bounded state; none reads a clock (callers pass
``received_ms``), so the stream, ``testing.replay`` and unit tests drive the same code:

* volume spikes and drops per (event type, source) against an EWMA baseline per time bucket,
* dead-letter rate jumps per source,
* bot-like identities: more events in a sliding window than a person plausibly sends,
* clock-skewed sources: median ``|received - timestamp|`` beyond a threshold.

In the stream (the parse stage of :mod:`pipeline.stream.topology`) every raw message becomes an
:class:`Observation` (:func:`observation_of`) and its alerts go to the ``alerts`` topic, the
warehouse and the metrics. Decisions:

* **Broker time, not event time.** ``received_ms`` is the raw record's Kafka timestamp: the
  collector's clock, the same on every replay of the topic. Event time (``timestamp``) is the
  client's clock: a skewed source would distort its own volume buckets and a bot could hide
  by faking it; a dead letter often has none; and clock skew is by definition the gap between
  the two. Simulated traffic is therefore produced with its delivery time as the record
  timestamp (``produce_messages(..., stamp_delivered=True)``), as a collector would have
  stamped it; traffic produced "now" from a past simulation is a backfill and its sources
  rightly show as clock-skewed.
* **One detector per input partition** (:class:`PartitionedDetector`). Within a partition
  broker time only moves forward; across partitions it does not: a consumer catching up on a
  backlog reads one partition's chunk (up to ``max.partition.fetch.bytes``) after another,
  hours of traffic apart, which would throw one merged detector's buckets into disorder
  (spurious spikes and drops) and make its alerts depend on fetch timing. Per partition, the
  alerts of a replay of the same topics are the same whatever the replica count or
  interleaving, hence the deterministic alert ids (a topic's partition count is fixed when it
  is made: 1 by default, N when `pipeline up --replicas N` makes them on the embedded broker).
  The cost: baselines and figures are per partition (1/N of the traffic; a spike spread
  over every partition is judged at about 1/sqrt(N) of its total z-score), and one incident
  may be reported by several partitions (same id for bucketed alerts; the open-alerts view
  keeps the newest per kind and subject).
* **Each replica detects over the partitions it owns, in memory.** Baselines are relearned
  after a restart or for a partition new to this replica (``min_buckets`` of warm-up); a
  partition that comes back resumes where it was, without judging the time away. Detectors
  see time only when traffic flows on their partition: a total outage raises nothing here.
  The Prometheus rules in ``deploy/prometheus/alerts.yml`` catch it: ``PipelineNoInput``
  (nothing read although the hour had traffic the day before: collectors or producers
  down), ``PipelineProcessorStalled`` (lag waits, nothing read), ``PipelineProcessorHung``
  (the loop stopped polling) and ``PipelineProcessorAbsent`` (no processor scraped).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.events import CleanEvent, Failure

AlertKind = Literal[
    "volume_spike", "volume_drop", "source_silent", "dead_letter_rate", "bot_identity", "clock_skew"
]
Severity = Literal["warning", "critical"]


@dataclass(frozen=True, slots=True)
class Alert:
    """One detected anomaly: what, about whom, the observed figure next to the expected one."""

    kind: AlertKind
    subject: str
    observed: float
    expected: float
    severity: Severity
    at_ms: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "subject": self.subject,
            "observed": self.observed,
            "expected": self.expected,
            "severity": self.severity,
            "at_ms": self.at_ms,
        }


@dataclass(frozen=True, slots=True)
class Observation:
    """What the detectors need of one incoming message (dead-lettered ones included)."""

    event_type: str
    source: str
    identity: str | None
    timestamp_ms: int | None
    received_ms: int
    dead_lettered: bool = False


@dataclass(frozen=True, slots=True)
class Ewma:
    """Exponentially weighted mean and variance (incremental form, Finch 2009)."""

    mean: float = 0.0
    var: float = 0.0
    n: int = 0

    def update(self, x: float, alpha: float) -> Ewma:
        if self.n == 0:
            return Ewma(x, 0.0, 1)
        diff = x - self.mean
        incr = alpha * diff
        return Ewma(self.mean + incr, (1 - alpha) * (self.var + diff * incr), self.n + 1)


class VolumeParams(BaseModel):
    """Volume baseline: bucket size, smoothing, thresholds (z-scores) and minimum volumes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bucket_ms: int = Field(60_000, gt=0)
    seasonal_slots: int = Field(
        1, ge=1, description="Baselines per key, by bucket index modulo this (24 = hour of day)."
    )
    alpha: float = Field(0.1, gt=0, le=1)
    # 5, not 4: detection runs per partition, so a deployment judges partitions x keys x
    # 1,440 buckets a day; on six clean simulated days (80k messages, 4 partitions) 4 gave
    # four false spikes, 5 one; a drop to zero is still seen from 25 expected
    z_threshold: float = Field(5.0, gt=0)
    critical_z: float = Field(8.0, gt=0)
    min_buckets: int = Field(10, ge=1, description="Buckets a baseline must have seen first.")
    min_volume: float = Field(
        20.0, ge=0, description="Spikes need this many events; drops need this many expected."
    )
    max_gap_buckets: int = Field(60, ge=1, description="Empty buckets counted after a silence.")
    # 3, not 1 (Poisson): events come in sessions, so a minute's count bursts above Poisson
    # noise, and the learned variance (ten buckets' memory) often says less after a quiet
    # spell. At one partition (4x the counts of four) six clean simulated runs (1.96M
    # messages, 7-14 days each) gave 9 false spike warnings with 1, 1 with 3 (four
    # partitions: none either way); every injected anomaly of the alerts test is still
    # reported at one and at four partitions. Drops are judged without it, so a stop is
    # still seen from 25 expected a minute
    dispersion: float = Field(
        3.0,
        ge=1.0,
        description="Least variance of a bucket count above its mean, as a multiple of the "
        "mean (1 = Poisson); below the mean (drops) Poisson's.",
    )
    silent_buckets: int = Field(
        5,
        ge=1,
        description="Buckets in a row with nothing from a key whose baseline makes a zero a "
        "drop: it is reported silent (critical, once) and its baseline stops learning until it "
        "sends again, so a dead source stays expected instead of quieting its own alerts.",
    )
    silent_forget_buckets: int = Field(
        1_440,
        ge=1,
        description="Buckets of silence after which a silent key is forgotten (decommissioned).",
    )


class DeadLetterParams(BaseModel):
    """Dead-letter rate per source and bucket against its EWMA baseline."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bucket_ms: int = Field(60_000, gt=0)
    alpha: float = Field(0.1, gt=0, le=1)
    z_threshold: float = Field(4.0, gt=0)
    min_jump: float = Field(0.05, gt=0, le=1, description="Smallest rate increase that alerts.")
    min_volume: int = Field(20, ge=1, description="Messages a bucket needs to be judged.")
    min_buckets: int = Field(5, ge=1)


class BotParams(BaseModel):
    """More than ``max_events`` from one identity within ``window_ms`` is not a person."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    window_ms: int = Field(60_000, gt=0)
    max_events: int = Field(60, ge=1)
    cooldown_ms: int = Field(600_000, ge=0, description="Quiet time before re-alerting one id.")


class ClockSkewParams(BaseModel):
    """A source whose median ``|received - timestamp|`` over recent events exceeds a threshold."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold_ms: int = Field(300_000, gt=0)
    critical_ms: int = Field(3_600_000, gt=0)
    window: int = Field(101, ge=1, description="Recent events per source the median is over.")
    min_samples: int = Field(30, ge=1)
    repeat_ms: int = Field(
        600_000, ge=0, description="While a source stays skewed, alert again after this long."
    )


class AnomalyParams(BaseModel):
    """Parameters of every detector; meant to be nested in the settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    volume: VolumeParams = VolumeParams()
    dead_letters: DeadLetterParams = DeadLetterParams()
    bots: BotParams = BotParams()
    clock_skew: ClockSkewParams = ClockSkewParams()


def volume_sigma(baseline: Ewma, dispersion: float = 1.0) -> float:
    """Spread a bucket count is judged by: the learned one, never below ``dispersion`` times
    Poisson noise's variance, nor below 1."""
    return max(math.sqrt(max(baseline.var, dispersion * baseline.mean)), 1.0)


class VolumeMonitor:
    """Counts per (event type, source) and bucket; judges each closed bucket, then learns it.

    A judged count enters the baseline clipped to the threshold band, so one spike does not
    inflate the baseline while a lasting change of level is still learned, a step at a time.

    A bucket watched only in part (the one this monitor starts in, or resumes in after
    :meth:`resync`) is neither judged nor learned: its count is a fraction of the traffic,
    which would read as a drop, or as a first baseline value that keeps a real drop unseen.
    """

    FORGET_BELOW = 0.01

    def __init__(self, params: VolumeParams | None = None) -> None:
        self.params = params or VolumeParams()
        self._baselines: dict[tuple[str, str, int], Ewma] = {}
        self._counts: Counter[tuple[str, str]] = Counter()
        self._known: set[tuple[str, str]] = set()
        self._bucket: int | None = None
        self._watched_from_ms = 0  # when this monitor started (or resumed) watching
        self._silent: Counter[tuple[str, str]] = Counter()  # zero buckets in a row that drop

    def observe(self, event_type: str, source: str, at_ms: int) -> list[Alert]:
        alerts = self.advance(at_ms)
        key = (event_type, source)
        self._counts[key] += 1
        self._known.add(key)
        return alerts

    def advance(self, now_ms: int) -> list[Alert]:
        """Close every bucket that ended by ``now_ms`` (silent buckets count as zero).

        Time never goes back: an observation older than the open bucket counts in it.
        """
        bucket = now_ms // self.params.bucket_ms
        if self._bucket is None:
            self._bucket, self._watched_from_ms = bucket, now_ms
        if bucket <= self._bucket:
            return []
        alerts: list[Alert] = []
        last = min(bucket, self._bucket + self.params.max_gap_buckets)
        while self._bucket < last:
            alerts.extend(self._close(self._bucket))
            self._bucket += 1
        self._bucket = bucket
        return alerts

    def baseline(self, event_type: str, source: str, bucket: int = 0) -> Ewma:
        slot = bucket % self.params.seasonal_slots
        return self._baselines.get((event_type, source, slot), Ewma())

    def resync(self, now_ms: int) -> None:
        """Move the clock to ``now_ms`` without judging the time in between, which this
        monitor did not observe (another replica did): the open bucket's partial counts go,
        the baselines stay."""
        self._counts.clear()
        self._bucket = now_ms // self.params.bucket_ms
        self._watched_from_ms = now_ms

    def _close(self, bucket: int) -> list[Alert]:
        p = self.params
        slot = bucket % p.seasonal_slots
        end_ms = (bucket + 1) * p.bucket_ms
        alerts: list[Alert] = []
        if self._watched_from_ms > bucket * p.bucket_ms:  # watched in part: a partial count
            self._counts.clear()
            return alerts
        for key in sorted(self._known):
            count = float(self._counts.get(key, 0))
            base = self._baselines.get((*key, slot), Ewma())
            learn = count
            if count > 0:
                self._silent.pop(key, None)
            elif self._silent[key] >= p.silent_buckets:  # known silent: neither judged nor learned
                self._silent[key] += 1
                if self._silent[key] >= p.silent_forget_buckets:
                    self._silent.pop(key, None)
                    for s in range(p.seasonal_slots):
                        self._baselines.pop((*key, s), None)
                    self._known.discard(key)
                continue
            if base.n >= p.min_buckets:
                # a spike is judged with the dispersion (sessions burst within a minute), a
                # drop without: a minute with no sessions at all stays improbable
                sigma_up = volume_sigma(base, p.dispersion)
                sigma_down = volume_sigma(base)
                z = (count - base.mean) / (sigma_up if count >= base.mean else sigma_down)
                subject = f"{key[0]}/{key[1]}"
                severity: Severity = "critical" if abs(z) >= p.critical_z else "warning"
                if z >= p.z_threshold and count >= p.min_volume:
                    alerts.append(
                        Alert("volume_spike", subject, count, base.mean, severity, end_ms)
                    )
                elif count == 0 and (self._silent[key] or z <= -p.z_threshold):
                    # a stop (its first zero a drop): its zeros are not learned, so that it
                    # stays a drop until it is reported silent, and the baseline waits for
                    # the source to come back
                    if base.mean >= p.min_volume:
                        self._silent[key] += 1
                        silent = self._silent[key] >= p.silent_buckets
                        kind: AlertKind = "source_silent" if silent else "volume_drop"
                        level: Severity = "critical" if silent else severity
                        alerts.append(Alert(kind, subject, count, base.mean, level, end_ms))
                        continue
                elif z <= -p.z_threshold and base.mean >= p.min_volume:
                    alerts.append(Alert("volume_drop", subject, count, base.mean, severity, end_ms))
                low = base.mean - p.z_threshold * sigma_down
                learn = min(max(count, low), base.mean + p.z_threshold * sigma_up)
            updated = base.update(learn, p.alpha)
            if learn == 0 and updated.mean < self.FORGET_BELOW:
                self._forget(key, slot)
            else:
                self._baselines[(*key, slot)] = updated
        self._counts.clear()
        return alerts

    def _forget(self, key: tuple[str, str], slot: int) -> None:
        """Drop a baseline that decayed to nothing, so keys that stop appearing cost no memory."""
        self._baselines.pop((*key, slot), None)
        if not any((*key, s) in self._baselines for s in range(self.params.seasonal_slots)):
            self._known.discard(key)


class DeadLetterMonitor:
    """Dead-letter share per source and bucket, judged against the source's EWMA of that share.

    A bucket alerts when its rate exceeds the baseline by at least ``min_jump`` and by
    ``z_threshold`` spreads, the spread never below binomial noise for the bucket's volume
    at the baseline rate or at one dead letter per bucket, whichever is higher.
    """

    def __init__(self, params: DeadLetterParams | None = None) -> None:
        self.params = params or DeadLetterParams()
        self._baselines: dict[str, Ewma] = {}
        self._totals: Counter[str] = Counter()
        self._dead: Counter[str] = Counter()
        self._bucket: int | None = None

    def observe(self, source: str, dead_lettered: bool, at_ms: int) -> list[Alert]:
        alerts = self.advance(at_ms)
        self._totals[source] += 1
        if dead_lettered:
            self._dead[source] += 1
        return alerts

    def advance(self, now_ms: int) -> list[Alert]:
        """Judge the open bucket once ``now_ms`` is past it (silent buckets judge nothing)."""
        bucket = now_ms // self.params.bucket_ms
        if self._bucket is None:
            self._bucket = bucket
        if bucket <= self._bucket:
            return []
        alerts = self._close((self._bucket + 1) * self.params.bucket_ms)
        self._bucket = bucket
        return alerts

    def baseline(self, source: str) -> Ewma:
        return self._baselines.get(source, Ewma())

    def resync(self, now_ms: int) -> None:
        """As :meth:`VolumeMonitor.resync`: the unobserved time in between is not judged."""
        self._totals.clear()
        self._dead.clear()
        self._bucket = now_ms // self.params.bucket_ms

    def _close(self, end_ms: int) -> list[Alert]:
        p = self.params
        alerts: list[Alert] = []
        for source in sorted(self._totals):
            total = self._totals[source]
            if total < p.min_volume:
                continue
            rate = self._dead[source] / total
            base = self._baselines.get(source, Ewma())
            learn = rate
            if base.n >= p.min_buckets:
                # a clean baseline (mean 0) must not turn one dead letter into an alert
                share = max(base.mean, 1 / total)
                noise = share * (1 - share) / total
                threshold = max(p.min_jump, p.z_threshold * math.sqrt(max(base.var, noise)))
                if rate - base.mean >= threshold:
                    severity: Severity = (
                        "critical" if rate - base.mean >= 2 * threshold else "warning"
                    )
                    alerts.append(
                        Alert("dead_letter_rate", source, rate, base.mean, severity, end_ms)
                    )
                    learn = base.mean + threshold
            self._baselines[source] = base.update(learn, p.alpha)
        self._totals.clear()
        self._dead.clear()
        return alerts


@dataclass
class _Recent:
    times: deque[int]  # arrival
    stamps: deque[int]  # event time, in the same order
    alerted_ms: int | None = None


class BotDetector:
    """Events per identity in a sliding window of arrival time; one alert per cooldown.

    Only events that also *happened* within a window of each other count (event time, when
    given): a backfill or a replay sped up delivers a person's days of history in seconds,
    which is fast arrival, not a bot. A bot that fakes spread-out timestamps shows as clock skew.

    Memory stays bounded: an identity's deques hold at most ``4 * max_events`` times, and
    identities silent for a whole window are forgotten at the next sweep.
    """

    def __init__(self, params: BotParams | None = None) -> None:
        self.params = params or BotParams()
        self._recent: dict[str, _Recent] = {}
        self._next_sweep_ms: int | None = None

    def observe(self, identity: str, at_ms: int, timestamp_ms: int | None = None) -> list[Alert]:
        p = self.params
        self._sweep(at_ms)
        recent = self._recent.get(identity)
        if recent is None:
            size = 4 * p.max_events
            recent = self._recent[identity] = _Recent(deque(maxlen=size), deque(maxlen=size))
        times, stamps = recent.times, recent.stamps
        stamp = at_ms if timestamp_ms is None else timestamp_ms
        times.append(at_ms)
        stamps.append(stamp)
        while times and times[0] <= at_ms - p.window_ms:
            times.popleft()
            stamps.popleft()
        if len(times) <= p.max_events:
            return []
        if recent.alerted_ms is not None and at_ms - recent.alerted_ms < p.cooldown_ms:
            return []
        count = sum(1 for s in stamps if abs(s - stamp) < p.window_ms)
        if count <= p.max_events:
            return []
        recent.alerted_ms = at_ms
        severity: Severity = "critical" if count >= 2 * p.max_events else "warning"
        return [Alert("bot_identity", identity, float(count), float(p.max_events), severity, at_ms)]

    @property
    def tracked(self) -> int:
        return len(self._recent)

    def _sweep(self, now_ms: int) -> None:
        p = self.params
        if self._next_sweep_ms is not None and now_ms < self._next_sweep_ms:
            return
        self._next_sweep_ms = now_ms + p.window_ms
        horizon = now_ms - max(p.window_ms, p.cooldown_ms)
        for identity in [i for i, r in self._recent.items() if r.times[-1] <= horizon]:
            del self._recent[identity]


@dataclass
class _SkewState:
    skews: deque[int]  # in arrival order, the newest ``window``
    ordered: list[int] = field(default_factory=list)  # the same, sorted: a median per event
    alerted_ms: int | None = None

    def add(self, skew: int) -> None:
        if len(self.skews) == self.skews.maxlen:
            oldest = self.skews[0]
            del self.ordered[bisect.bisect_left(self.ordered, oldest)]
        self.skews.append(skew)
        bisect.insort(self.ordered, skew)

    def median(self) -> float:
        ordered, n = self.ordered, len(self.ordered)
        mid = n // 2
        return float(ordered[mid]) if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


class ClockSkewMonitor:
    """Median ``|received - timestamp|`` per source over its last ``window`` events.

    Alerts when a source becomes skewed, again every ``repeat_ms`` while it stays skewed (so
    the alert stays open), and re-arms once its median is back under the threshold; the median
    ignores the few legitimately late (offline, retried) events.
    """

    def __init__(self, params: ClockSkewParams | None = None) -> None:
        self.params = params or ClockSkewParams()
        self._sources: dict[str, _SkewState] = {}

    def observe(self, source: str, timestamp_ms: int, received_ms: int) -> list[Alert]:
        p = self.params
        state = self._sources.get(source)
        if state is None:
            state = self._sources[source] = _SkewState(deque(maxlen=p.window))
        state.add(abs(received_ms - timestamp_ms))
        if len(state.skews) < p.min_samples:
            return []
        median = state.median()
        if median < p.threshold_ms:
            state.alerted_ms = None
            return []
        if state.alerted_ms is not None and received_ms - state.alerted_ms < p.repeat_ms:
            return []
        state.alerted_ms = received_ms
        severity: Severity = "critical" if median >= p.critical_ms else "warning"
        return [Alert("clock_skew", source, median, float(p.threshold_ms), severity, received_ms)]

    def median_ms(self, source: str) -> float | None:
        state = self._sources.get(source)
        return state.median() if state and state.skews else None


@dataclass
class AnomalyDetector:
    """Every detector behind one ``observe``; feed it each message in arrival order."""

    params: AnomalyParams = field(default_factory=AnomalyParams)
    volume: VolumeMonitor = field(init=False)
    dead_letters: DeadLetterMonitor = field(init=False)
    bots: BotDetector = field(init=False)
    clock_skew: ClockSkewMonitor = field(init=False)

    def __post_init__(self) -> None:
        self.volume = VolumeMonitor(self.params.volume)
        self.dead_letters = DeadLetterMonitor(self.params.dead_letters)
        self.bots = BotDetector(self.params.bots)
        self.clock_skew = ClockSkewMonitor(self.params.clock_skew)

    def observe(self, obs: Observation) -> list[Alert]:
        at = obs.received_ms
        alerts = self.dead_letters.observe(obs.source, obs.dead_lettered, at)
        if obs.dead_lettered:
            alerts.extend(self.volume.advance(at))
            return alerts
        alerts.extend(self.volume.observe(obs.event_type, obs.source, at))
        if obs.identity:
            alerts.extend(self.bots.observe(obs.identity, at, obs.timestamp_ms))
        if obs.timestamp_ms is not None:
            alerts.extend(self.clock_skew.observe(obs.source, obs.timestamp_ms, at))
        return alerts

    def advance(self, now_ms: int) -> list[Alert]:
        """Close buckets while no traffic arrives, so that a source going silent is noticed."""
        return [*self.dead_letters.advance(now_ms), *self.volume.advance(now_ms)]

    def resync(self, now_ms: int) -> None:
        """Resume at ``now_ms`` after traffic this detector did not see (its partition was
        another replica's meanwhile): that time is neither silence nor a drop."""
        self.volume.resync(now_ms)
        self.dead_letters.resync(now_ms)


UNKNOWN_SOURCE = "unknown"
"""The source of a message whose payload does not say (unreadable dead letters)."""
DEAD_LETTER_TYPE = "invalid"
"""The event type of a dead letter whose event name cannot be read."""


def observation_of(
    parsed: CleanEvent | Failure, received_ms: int, now_ms: int | None = None
) -> Observation:
    """What the detectors need of one parse result; ``received_ms`` is the broker time.

    A record stamped after ``now_ms`` (a producer's clock set ahead: topics keep CreateTime)
    counts as received now. Taken as it is, it would move its partition's bucket clock into
    the future, where that one bucket never closes: no alert until the clock caught up.
    """
    if now_ms is not None and received_ms > now_ms:
        received_ms = now_ms
    if isinstance(parsed, Failure):
        return Observation(
            parsed.event_name or DEAD_LETTER_TYPE,
            parsed.source or UNKNOWN_SOURCE,
            None,
            None,
            received_ms,
            dead_lettered=True,
        )
    return Observation(
        parsed.name,
        parsed.source or UNKNOWN_SOURCE,
        parsed.user_id or parsed.anonymous_id or parsed.previous_id,
        parsed.timestamp_ms,
        received_ms,
    )


def alert_id(kind: str, subject: str, at_ms: int) -> str:
    """Deterministic id of an alert: re-processing the same input stores it once."""
    return hashlib.sha256(f"{kind}\x1f{subject}\x1f{at_ms}".encode()).hexdigest()[:32]


def alert_record(alert: Alert, partition: int | None = None) -> dict[str, Any]:
    """The wire form of an alert (alerts topic, warehouse); ``partition`` that detected it."""
    return {
        "alert_id": alert_id(alert.kind, alert.subject, alert.at_ms),
        "alert_kind": alert.kind,
        "subject": alert.subject,
        "severity": alert.severity,
        "observed": alert.observed,
        "expected": alert.expected,
        "at_ms": alert.at_ms,
        "partition": partition,
    }


class PartitionedDetector:
    """An :class:`AnomalyDetector` per input partition, created on its first message.

    See the module docstring for why detection runs per partition. A partition revoked from
    this replica keeps its (bounded) detector until the process ends. When it comes back, the
    messages another replica read meanwhile show as a jump in offsets (more than
    ``OFFSET_SLACK``, which transaction markers and aborted records account for): the
    detector resumes at the new message's time instead of judging the time it did not watch
    as silence (spurious drops, then spikes against a decayed baseline).
    """

    OFFSET_SLACK = 64

    def __init__(self, params: AnomalyParams | None = None) -> None:
        self.params = params or AnomalyParams()
        self._detectors: dict[int, AnomalyDetector] = {}
        self._next_offset: dict[int, int] = {}

    def detector(self, partition: int) -> AnomalyDetector:
        det = self._detectors.get(partition)
        if det is None:
            det = self._detectors[partition] = AnomalyDetector(self.params)
        return det

    def observe(self, partition: int, obs: Observation, offset: int | None = None) -> list[Alert]:
        """Feed one message of ``partition``; with its ``offset``, a jump past what this
        replica read resynchronizes the partition's detector first."""
        det = self.detector(partition)
        if offset is not None:
            expected = self._next_offset.get(partition)
            if expected is not None and offset > expected + self.OFFSET_SLACK:
                det.resync(obs.received_ms)
            self._next_offset[partition] = max(offset + 1, expected or 0)
        return det.observe(obs)

    def advance(self, now_ms: int) -> list[Alert]:
        """Close every partition's buckets up to ``now_ms`` (e.g. at shutdown, in tests)."""
        return [a for p in sorted(self._detectors) for a in self._detectors[p].advance(now_ms)]
