"""Stage 2's outputs sent in bursts: when the oldest is due and at each checkpoint, every record
in order, the newest profile per key, tombstones serialized as such, nothing left after a flush
or an abandoned checkpoint; and the fan-out sink that feeds it beside the warehouse sink."""

from __future__ import annotations

from typing import Any

import orjson
from quixstreams.models.topics import Topic

from pipeline.stream.stages import KIND_ERASED, KIND_EVENT, KIND_PROFILE
from pipeline.stream.topology import (
    BurstProducer,
    FanOutSink,
    TombstoneSerializer,
    WarehouseSink,
)


class Produced:
    """Stands in for quixstreams' producer: keeps every produce call's arguments."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def produce(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)

    def by_topic(self, name: str) -> list[tuple[bytes | None, Any]]:
        return [
            (c["key"], None if c["value"] is None else orjson.loads(c["value"]))
            for c in self.calls
            if c["topic"] == name
        ]


CLEAN = Topic("clean", key_serializer="str", value_serializer="json")
PROFILES = Topic(
    "profiles", key_serializer="str", value_serializer=TombstoneSerializer(KIND_ERASED)
)
ROUTES = {KIND_EVENT: CLEAN, KIND_PROFILE: PROFILES, KIND_ERASED: PROFILES}


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sink_and_producer(clock: Clock | None = None) -> tuple[BurstProducer, Produced]:
    produced = Produced()
    sink = BurstProducer(
        lambda: produced,
        ROUTES,
        max_delay_ms=100,
        newest_only=frozenset({KIND_PROFILE, KIND_ERASED}),
        clock=clock or Clock(),
    )
    return sink, produced


def add(sink: BurstProducer | FanOutSink, value: dict[str, Any], key: str, ts: int) -> None:
    sink.add(value, key, ts, None, "events.attributed", 0, ts)


def test_nothing_is_produced_before_the_checkpoint_and_everything_at_it() -> None:
    sink, produced = sink_and_producer()
    for i in range(3):
        add(sink, {"kind": KIND_EVENT, "message_id": f"m{i}"}, "c1", 100 + i)
        add(sink, {"kind": KIND_PROFILE, "customer_id": "c1", "version": i + 1}, "c1", 100 + i)
    add(sink, {"kind": KIND_PROFILE, "customer_id": "c2", "version": 7}, "c2", 104)
    add(sink, {"kind": "retire"}, "c1", 105)  # a kind it has no route for: not its record
    assert produced.calls == []

    sink.flush()
    # every event, in the order made, with its own timestamp
    assert produced.by_topic("clean") == [
        (b"c1", {"kind": KIND_EVENT, "message_id": f"m{i}"}) for i in range(3)
    ]
    assert [c["timestamp"] for c in produced.calls if c["topic"] == "clean"] == [100, 101, 102]
    # the profiles topic is a table: the newest per customer only
    assert produced.by_topic("profiles") == [
        (b"c1", {"kind": KIND_PROFILE, "customer_id": "c1", "version": 3}),
        (b"c2", {"kind": KIND_PROFILE, "customer_id": "c2", "version": 7}),
    ]
    sink.flush()  # the next checkpoint: nothing is sent twice
    assert len(produced.calls) == 5


def test_a_burst_goes_once_its_oldest_record_is_due_with_the_newest_profile_so_far() -> None:
    clock = Clock()
    sink, produced = sink_and_producer(clock)
    add(sink, {"kind": KIND_PROFILE, "customer_id": "c1", "version": 1}, "c1", 1)
    clock.now += 0.09
    add(sink, {"kind": KIND_EVENT, "message_id": "m1"}, "c1", 2)
    assert produced.calls == []  # the oldest is 90 ms old
    clock.now += 0.02
    add(sink, {"kind": KIND_PROFILE, "customer_id": "c1", "version": 2}, "c1", 3)
    assert produced.by_topic("profiles") == [
        (b"c1", {"kind": KIND_PROFILE, "customer_id": "c1", "version": 2})
    ]
    assert len(produced.by_topic("clean")) == 1
    # the next burst's clock starts at its own first record
    clock.now += 0.05
    add(sink, {"kind": KIND_EVENT, "message_id": "m2"}, "c1", 4)
    clock.now += 0.06
    add(sink, {"kind": KIND_EVENT, "message_id": "m3"}, "c1", 5)
    assert len(produced.calls) == 2  # m2 is 60 ms old: the 110 ms since m1's burst do not count
    clock.now += 0.05
    add(sink, {"kind": KIND_EVENT, "message_id": "m4"}, "c1", 6)
    assert [v["message_id"] for _, v in produced.by_topic("clean")] == ["m1", "m2", "m3", "m4"]


def test_an_erasure_after_an_update_leaves_the_tombstone() -> None:
    sink, produced = sink_and_producer()
    add(sink, {"kind": KIND_PROFILE, "customer_id": "c1", "version": 4}, "c1", 1)
    add(sink, {"kind": KIND_ERASED, "customer_id": "c1"}, "c1", 2)
    sink.flush()
    assert produced.by_topic("profiles") == [(b"c1", None)]


def test_an_abandoned_checkpoint_drops_what_it_held() -> None:
    sink, produced = sink_and_producer()
    add(sink, {"kind": KIND_EVENT, "message_id": "m1"}, "c1", 1)
    add(sink, {"kind": KIND_PROFILE, "customer_id": "c1", "version": 1}, "c1", 1)
    sink.on_paused()  # backpressure: the input is read again from the checkpoint's start
    sink.flush()
    assert produced.calls == []


def test_fan_out_feeds_and_flushes_every_part() -> None:
    sink, produced = sink_and_producer()
    written: list[list[dict[str, Any]]] = []
    store = WarehouseSink(written.append, frozenset({KIND_EVENT}), max_delay_ms=60_000)
    both = FanOutSink(sink, store)
    add(both, {"kind": KIND_EVENT, "message_id": "m1"}, "c1", 1)
    both.flush()
    assert produced.by_topic("clean") == [(b"c1", {"kind": KIND_EVENT, "message_id": "m1"})]
    assert written == [[{"kind": KIND_EVENT, "message_id": "m1"}]]
    add(both, {"kind": KIND_EVENT, "message_id": "m2"}, "c1", 2)
    both.on_paused()
    both.flush()
    assert len(produced.calls) == 1 and len(written) == 1
