"""Anomaly detection on incoming traffic: pure, online detectors that turn observations into alerts.

Each detector is fed in arrival order and keeps bounded state; none reads a clock (callers pass
``received_ms``), so the stream, ``testing.replay`` and unit tests drive the same code:

* volume spikes and drops per (event type, source) against an EWMA baseline per time bucket,
* dead-letter rate jumps per source,
* bot-like identities: more events in a sliding window than a person plausibly sends,
* clock-skewed sources: median ``|received - timestamp|`` beyond a threshold.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

AlertKind = Literal["volume_spike", "volume_drop", "dead_letter_rate", "bot_identity", "clock_skew"]
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
    z_threshold: float = Field(4.0, gt=0)
    critical_z: float = Field(8.0, gt=0)
    min_buckets: int = Field(10, ge=1, description="Buckets a baseline must have seen first.")
    min_volume: float = Field(
        20.0, ge=0, description="Spikes need this many events; drops need this many expected."
    )
    max_gap_buckets: int = Field(60, ge=1, description="Empty buckets counted after a silence.")


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


class AnomalyParams(BaseModel):
    """Parameters of every detector; meant to be nested in the settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    volume: VolumeParams = VolumeParams()
    dead_letters: DeadLetterParams = DeadLetterParams()
    bots: BotParams = BotParams()
    clock_skew: ClockSkewParams = ClockSkewParams()


def volume_sigma(baseline: Ewma) -> float:
    """Spread a bucket count is judged by: the learned one, never below Poisson noise or 1."""
    return max(math.sqrt(max(baseline.var, baseline.mean)), 1.0)


class VolumeMonitor:
    """Counts per (event type, source) and bucket; judges each closed bucket, then learns it.

    A judged count enters the baseline clipped to the threshold band, so one spike does not
    inflate the baseline while a lasting change of level is still learned, a step at a time.
    """

    FORGET_BELOW = 0.01

    def __init__(self, params: VolumeParams | None = None) -> None:
        self.params = params or VolumeParams()
        self._baselines: dict[tuple[str, str, int], Ewma] = {}
        self._counts: Counter[tuple[str, str]] = Counter()
        self._known: set[tuple[str, str]] = set()
        self._bucket: int | None = None

    def observe(self, event_type: str, source: str, at_ms: int) -> list[Alert]:
        alerts = self.advance(at_ms)
        key = (event_type, source)
        self._counts[key] += 1
        self._known.add(key)
        return alerts

    def advance(self, now_ms: int) -> list[Alert]:
        """Close every bucket that ended by ``now_ms`` (silent buckets count as zero)."""
        bucket = now_ms // self.params.bucket_ms
        if self._bucket is None:
            self._bucket = bucket
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

    def _close(self, bucket: int) -> list[Alert]:
        p = self.params
        slot = bucket % p.seasonal_slots
        end_ms = (bucket + 1) * p.bucket_ms
        alerts: list[Alert] = []
        for key in sorted(self._known):
            count = float(self._counts.get(key, 0))
            base = self._baselines.get((*key, slot), Ewma())
            learn = count
            if base.n >= p.min_buckets:
                sigma = volume_sigma(base)
                z = (count - base.mean) / sigma
                subject = f"{key[0]}/{key[1]}"
                severity: Severity = "critical" if abs(z) >= p.critical_z else "warning"
                if z >= p.z_threshold and count >= p.min_volume:
                    alerts.append(
                        Alert("volume_spike", subject, count, base.mean, severity, end_ms)
                    )
                elif z <= -p.z_threshold and base.mean >= p.min_volume:
                    alerts.append(Alert("volume_drop", subject, count, base.mean, severity, end_ms))
                band = p.z_threshold * sigma
                learn = min(max(count, base.mean - band), base.mean + band)
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
    ``z_threshold`` spreads, the spread never below binomial noise for the bucket's volume.
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
                noise = base.mean * (1 - base.mean) / total
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
    times: deque[int]
    alerted_ms: int | None = None


class BotDetector:
    """Events per identity in a sliding window of arrival time; one alert per cooldown.

    Memory stays bounded: an identity's deque holds at most ``4 * max_events`` times, and
    identities silent for a whole window are forgotten at the next sweep.
    """

    def __init__(self, params: BotParams | None = None) -> None:
        self.params = params or BotParams()
        self._recent: dict[str, _Recent] = {}
        self._next_sweep_ms: int | None = None

    def observe(self, identity: str, at_ms: int) -> list[Alert]:
        p = self.params
        self._sweep(at_ms)
        recent = self._recent.get(identity)
        if recent is None:
            recent = self._recent[identity] = _Recent(deque(maxlen=4 * p.max_events))
        times = recent.times
        times.append(at_ms)
        while times and times[0] <= at_ms - p.window_ms:
            times.popleft()
        count = len(times)
        if count <= p.max_events:
            return []
        if recent.alerted_ms is not None and at_ms - recent.alerted_ms < p.cooldown_ms:
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
    skews: deque[int]
    skewed: bool = False


class ClockSkewMonitor:
    """Median ``|received - timestamp|`` per source over its last ``window`` events.

    Alerts when a source becomes skewed and re-arms once its median is back under the
    threshold; the median ignores the few legitimately late (offline, retried) events.
    """

    def __init__(self, params: ClockSkewParams | None = None) -> None:
        self.params = params or ClockSkewParams()
        self._sources: dict[str, _SkewState] = {}

    def observe(self, source: str, timestamp_ms: int, received_ms: int) -> list[Alert]:
        p = self.params
        state = self._sources.get(source)
        if state is None:
            state = self._sources[source] = _SkewState(deque(maxlen=p.window))
        state.skews.append(abs(received_ms - timestamp_ms))
        if len(state.skews) < p.min_samples:
            return []
        median = float(statistics.median(state.skews))
        if median < p.threshold_ms:
            state.skewed = False
            return []
        if state.skewed:
            return []
        state.skewed = True
        severity: Severity = "critical" if median >= p.critical_ms else "warning"
        return [Alert("clock_skew", source, median, float(p.threshold_ms), severity, received_ms)]

    def median_ms(self, source: str) -> float | None:
        state = self._sources.get(source)
        return float(statistics.median(state.skews)) if state and state.skews else None


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
            alerts.extend(self.bots.observe(obs.identity, at))
        if obs.timestamp_ms is not None:
            alerts.extend(self.clock_skew.observe(obs.source, obs.timestamp_ms, at))
        return alerts

    def advance(self, now_ms: int) -> list[Alert]:
        """Close buckets while no traffic arrives, so that a source going silent is noticed."""
        return [*self.dead_letters.advance(now_ms), *self.volume.advance(now_ms)]
