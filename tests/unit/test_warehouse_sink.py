"""The warehouse sink: written by its thread once due, everything written at a checkpoint, in
order, failures surfacing in the processing thread."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from pipeline.stream.topology import WarehouseSink


class Recorder:
    """A write callback that keeps every batch (and can be told to fail or to block)."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.fail: Exception | None = None
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, batch: list[dict[str, Any]]) -> None:
        self.entered.set()
        self.gate.wait(10)
        self.threads.add(threading.current_thread().name)
        if self.fail is not None:
            raise self.fail
        self.batches.append(batch)

    @property
    def written(self) -> list[int]:
        return [r["n"] for batch in self.batches for r in batch]


def add(sink: WarehouseSink, n: int, kind: str = "event") -> None:
    sink.add({"kind": kind, "n": n}, None, 0, None, "t", 0, n)


def wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_a_batch_is_written_by_the_thread_without_more_records_or_a_checkpoint() -> None:
    rec = Recorder()
    sink = WarehouseSink(rec, frozenset({"event"}), max_delay_ms=5)
    add(sink, 1)
    add(sink, 2, kind="profile")  # not this sink's kind: ignored
    wait_for(lambda: rec.written == [1])
    assert rec.threads == {"warehouse-sink"}


def test_with_no_delay_what_arrives_during_a_write_is_the_next_batch() -> None:
    """The default: the first record is written at once, and the records added while that
    write lasts go together in the next one (batches grow with the load by themselves)."""
    rec = Recorder()
    sink = WarehouseSink(rec, frozenset({"event"}), max_delay_ms=0)
    rec.gate.clear()  # the first write blocks until released
    add(sink, 1)
    assert rec.entered.wait(10)
    for n in (2, 3, 4):
        add(sink, n)
    rec.gate.set()
    wait_for(lambda: rec.written == [1, 2, 3, 4])
    assert [[r["n"] for r in batch] for batch in rec.batches] == [[1], [2, 3, 4]]
    assert rec.threads == {"warehouse-sink"}


def test_checkpoint_flush_writes_everything_added_before_it_in_order() -> None:
    rec = Recorder()
    sink = WarehouseSink(rec, frozenset({"event"}), max_delay_ms=60_000)  # the thread waits
    for n in range(100):
        add(sink, n)
    sink.flush()
    assert rec.written == list(range(100))
    assert rec.threads == {"MainThread"}
    sink.flush()  # nothing left: nothing written
    assert len(rec.batches) == 1


def test_a_checkpoint_waits_for_the_batch_being_written() -> None:
    rec = Recorder()
    sink = WarehouseSink(rec, frozenset({"event"}), max_delay_ms=1)
    rec.gate.clear()  # the thread's write blocks
    add(sink, 1)
    wait_for(rec.entered.is_set)  # the thread took batch 1
    add(sink, 2)
    flushed = threading.Thread(target=sink.flush)
    flushed.start()
    flushed.join(0.05)
    assert flushed.is_alive(), "the checkpoint returned before batch 1 was written"
    rec.gate.set()
    flushed.join(10)
    assert rec.written == [1, 2]


def test_a_failed_write_fails_the_next_checkpoint() -> None:
    rec = Recorder()
    rec.fail = RuntimeError("disk full")
    sink = WarehouseSink(rec, frozenset({"event"}), max_delay_ms=1)
    add(sink, 1)
    wait_for(lambda: sink._error is not None)
    rec.fail = None
    with pytest.raises(RuntimeError, match="disk full"):
        sink.flush()


def test_the_thread_stops_when_idle_and_starts_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(WarehouseSink, "IDLE_EXIT_S", 0.05)
    rec = Recorder()
    sink = WarehouseSink(rec, frozenset({"event"}), max_delay_ms=1)
    add(sink, 1)
    wait_for(lambda: rec.written == [1] and sink._writer is None)
    add(sink, 2)
    wait_for(lambda: rec.written == [1, 2])


def test_paused_drops_what_is_pending() -> None:
    rec = Recorder()
    sink = WarehouseSink(rec, frozenset({"event"}), max_delay_ms=60_000)
    add(sink, 1)
    sink.on_paused()
    sink.flush()
    assert rec.written == []


def test_errors_of_the_framework_are_not_taken_for_bad_records() -> None:
    """A step's own failure on a record is dead-lettered; quixstreams', its state store's and
    the Kafka client's (a rebalance, a fenced transaction) must stop the step instead."""
    from confluent_kafka import KafkaException
    from quixstreams.state.exceptions import PartitionNotAssignedError

    from pipeline.stream.topology import _framework_error

    assert _framework_error(KafkaException("fenced"))
    assert _framework_error(PartitionNotAssignedError("revoked"))
    assert not _framework_error(ValueError("bad record"))
    assert not _framework_error(KeyError("customer_id"))
