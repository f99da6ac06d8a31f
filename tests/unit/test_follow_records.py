"""What a serving replica applies of the records it reads (a real SQLite store; the messages
stand in for what confluent-kafka's ``consume`` returns, as far as the follower reads them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import pipeline.stores.follow as follow
from pipeline.anomaly import Alert, alert_record
from pipeline.errors import StoreError
from pipeline.identity import anonymous_customer_id, sha256_hex
from pipeline.scoring import new_profile, profile_to_dict
from pipeline.settings import Settings
from pipeline.stores.follow import StoreFollower, purge_forgotten, seed_copy
from pipeline.stores.local import LocalWarehouse
from pipeline.stream.stages import (
    KIND_ALERT,
    KIND_DEAD_LETTER,
    KIND_ERASED,
    KIND_EVENT,
    KIND_LINK,
    KIND_PROFILE,
)
from pipeline.testing import make_dead_letter, make_event


class Message:
    def __init__(
        self,
        value: bytes | None,
        offset: int,
        *,
        topic: str = "events.clean",
        key: bytes | None = None,
    ) -> None:
        self._value = value
        self._offset = offset
        self._topic = topic
        self._key = key

    def error(self) -> None:
        return None

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


def _event(customer: str, **fields: Any) -> bytes:
    record: dict[str, Any] = make_event(user_id=customer, customer_id=customer).to_dict()
    return orjson.dumps({**record, "customer_id": customer, "kind": KIND_EVENT, **fields})


Replica = tuple[LocalWarehouse, set[str], StoreFollower]


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[Replica]:
    """A copy's store, the forgotten customers' hashed ids, and a follower writing to it."""
    forgotten: set[str] = set()
    with LocalWarehouse(tmp_path / "replica.sqlite") as wh:
        follower = StoreFollower(
            Settings(home=tmp_path),
            "127.0.0.1:9",  # never reached: these tests hand the records over themselves
            wh,
            suppressed=lambda fresh=False: frozenset(forgotten),
        )
        yield wh, forgotten, follower
        follower.close()  # works on a follower never started


def test_records_are_applied_and_undecodable_ones_counted(
    replica: Replica,
) -> None:
    wh, _, follower = replica
    event = _event("c1")
    follower._apply([Message(event, 0), Message(b"{not json", 1), Message(b"[1]", 2)])
    assert wh.counts()["events"] == 1
    assert (follower.applied, follower.dropped) == (1, 2)
    follower._apply([Message(event, 0)])  # read again after a restart: not stored twice
    assert wh.counts()["events"] == 1


def test_a_forgotten_customers_records_are_dropped_but_their_erasure_applied(
    replica: Replica,
) -> None:
    wh, forgotten, follower = replica
    follower._apply([Message(_event("c1"), 0), Message(_event("c2"), 1)])
    assert wh.counts()["events"] == 2
    forgotten.add(sha256_hex("c1"))
    erased = {"kind": KIND_ERASED, "customer_id": "c1", "requested_at": None, "erased_ms": 1}
    # an event of theirs read after the erasure notice (another topic): not written back
    follower._apply([Message(orjson.dumps(erased), 2), Message(_event("c1"), 3)])
    assert wh.count_customer_rows(["c1"], [], "c1")["events"] == 0
    assert wh.counts()["events"] == 1  # c2's
    assert follower.dropped == 1


def test_a_tombstone_on_the_profile_topic_erases_that_customer(replica: Replica) -> None:
    wh, _, follower = replica
    profile = {**profile_to_dict(new_profile("c1", is_anonymous=False)), "kind": KIND_PROFILE}
    updates = "profiles.updates"
    follower._apply(
        [
            Message(_event("c1"), 0),
            Message(_event("c2"), 1),
            Message(orjson.dumps(profile), 0, topic=updates, key=b"c1"),
        ]
    )
    assert wh.count_customer_rows(["c1"], [], "c1")["profiles"] == 1
    # what the processor writes there for an erasure (the topic is compacted)
    follower._apply([Message(None, 1, topic=updates, key=b"c1")])
    assert not any(wh.count_customer_rows(["c1"], [], "c1").values())
    assert wh.counts()["events"] == 1  # c2's
    # no value on a topic that is not a table: nothing it could mean, so dropped
    follower._apply([Message(None, 2, key=b"c2")])
    assert wh.counts()["events"] == 1
    assert (follower.applied, follower.dropped) == (4, 1)


def test_a_record_not_as_the_processor_writes_it_is_dropped_alone(
    replica: Replica,
) -> None:
    wh, _, follower = replica
    no_id = orjson.dumps({"kind": KIND_EVENT, "customer_id": "c3"})  # rows cannot be built
    unbindable = _event("c4", message_id={"not": "a string"})  # SQLite refuses the row
    follower._apply(
        [
            Message(_event("c1"), 0),
            Message(no_id, 1),
            Message(unbindable, 2),
            Message(_event("c2"), 3),
        ]
    )
    assert wh.count_customer_rows(["c1"], [], "c1")["events"] == 1
    assert wh.count_customer_rows(["c2"], [], "c2")["events"] == 1
    assert wh.counts()["events"] == 2
    assert (follower.applied, follower.dropped) == (2, 2)


def test_a_full_store_fails_the_batch_for_a_retry_and_drops_nothing(
    replica: Replica,
) -> None:
    wh, _, follower = replica
    batch = [Message(_event(f"c{i}"), i) for i in range(300)]  # needs new pages
    pages = int(wh.scalar("PRAGMA page_count"))
    wh._conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full
    with pytest.raises(StoreError, match="full"):
        follower._apply(batch)
    assert (follower.applied, follower.dropped, wh.counts()["events"]) == (0, 0, 0)
    wh._conn.execute("PRAGMA max_page_count = 1073741823")  # space again: the retry writes
    follower._apply(batch)
    assert (follower.applied, follower.dropped, wh.counts()["events"]) == (300, 0, 300)


def test_a_topic_whose_id_changes_loses_its_positions_and_its_tables_rows(
    replica: Replica,
) -> None:
    wh, _, follower = replica
    follower._apply([Message(_event("c1"), 0), Message(_event("c2"), 1)])  # events.clean
    positions = {("events.clean", 0): 2, ("events.clean", 1): 7, ("alerts", 0): 3}
    wh.save_replica_positions(positions)
    tables = {"events.clean": "events", "alerts": "alerts"}
    ids = {"events.clean": "id-e", "alerts": "id-a"}
    assert wh.adopt_replica_topics(ids, tables=tables) == []  # first ids: all kept
    assert wh.adopt_replica_topics(ids, tables=tables) == []  # the same topics: kept
    assert wh.replica_positions() == positions
    assert wh.counts()["events"] == 2
    # events.clean was recreated: read from its start into an empty table
    assert wh.adopt_replica_topics({"events.clean": "id-e2"}, tables=tables) == ["events.clean"]
    assert wh.replica_positions() == {("alerts", 0): 3}
    assert wh.replica_topic_ids() == {"events.clean": "id-e2", "alerts": "id-a"}
    assert wh.counts()["events"] == 0
    # told by a partition's end instead (no ids): the same
    follower._apply([Message(_event("c3"), 0)])
    wh.restart_replica_topics(["events.clean"], tables=tables)
    assert (wh.counts()["events"], wh.replica_positions()) == (0, {("alerts", 0): 3})


def test_a_tombstone_on_the_links_topic_erases_that_device(replica: Replica) -> None:
    wh, _, follower = replica
    link = {
        "kind": KIND_LINK,
        "anonymous_id": "dev-1",
        "customer_id": "c1",
        "previous_customer_id": None,
        "linked_ms": 1,
        "via_message_id": "m1",
        "merged_events": 0,
    }
    other = {**link, "anonymous_id": "dev-2"}
    links = "identities.links"
    follower._apply(
        [
            Message(orjson.dumps(link), 0, topic=links, key=b"dev-1"),
            Message(orjson.dumps(other), 1, topic=links, key=b"dev-2"),
            Message(_event("anon:dev-1", anonymous_id="dev-1", user_id=None), 0),
        ]
    )
    linked = "SELECT anonymous_id FROM identity_links ORDER BY anonymous_id"
    assert wh.query(linked)["anonymous_id"].tolist() == ["dev-1", "dev-2"]
    # what the processor's stage 1 writes there when it erases the device's link: that link
    # goes (the device's other rows go with its anonymous profile's tombstone, elsewhere)
    follower._apply([Message(None, 2, topic=links, key=b"dev-1")])
    assert wh.query(linked)["anonymous_id"].tolist() == ["dev-2"]
    assert wh.counts()["events"] == 1
    # a later link of the device (another customer signing in on it) is kept
    follower._apply([Message(orjson.dumps({**link, "customer_id": "c9"}), 3, topic=links)])
    assert wh.query(linked)["anonymous_id"].tolist() == ["dev-1", "dev-2"]
    assert (follower.applied, follower.dropped) == (5, 0)
    # and so it is when the erasure and the new link come in one batch (writes go first)
    other_device = {**link, "anonymous_id": "dev-3"}
    follower._apply(
        [
            Message(orjson.dumps(other_device), 4, topic=links),
            Message(None, 5, topic=links, key=b"dev-3"),
            Message(orjson.dumps({**other_device, "customer_id": "c9"}), 6, topic=links),
        ]
    )
    pairs = wh.query(
        "SELECT anonymous_id, customer_id FROM identity_links WHERE anonymous_id = 'dev-3'"
    )
    assert pairs.values.tolist() == [["dev-3", "c9"]]


def test_a_tombstone_whose_key_is_not_a_customer_id_is_dropped(replica: Replica) -> None:
    _, _, follower = replica
    follower._apply([Message(None, 0, topic="profiles.updates", key=b"\xff\xfe")])
    assert (follower.applied, follower.dropped) == (0, 1)


def test_a_copy_starts_from_a_snapshot_only_when_it_has_none(
    replica: Replica, tmp_path: Path
) -> None:
    wh, _, follower = replica
    follower._apply([Message(_event("c1"), 0), Message(_event("c2"), 1)])
    wh.adopt_replica_topics({"events.clean": "id-1"})
    with pytest.raises(StoreError, match="is a directory"):  # `pipeline snapshot some-dir/`
        wh.snapshot(tmp_path)
    assert not list(tmp_path.glob(".*.partial"))
    snapshot = wh.snapshot(tmp_path / "snapshots" / "replica.sqlite")
    copy = tmp_path / "pod" / "warehouse.sqlite"
    assert seed_copy(snapshot, copy)
    with LocalWarehouse(copy) as seeded:
        assert seeded.counts()["events"] == 2
        assert seeded.replica_positions() == {("events.clean", 0): 2}
        assert seeded.replica_topic_ids() == {"events.clean": "id-1"}
        seeded.delete_customer(["c2"], [], "c2")  # the copy goes on from there
    assert not seed_copy(snapshot, copy)  # a restarted pod keeps its own, newer copy
    with LocalWarehouse(copy, read_only=True) as kept:
        assert kept.counts()["events"] == 1
    not_a_store = tmp_path / "garbage.sqlite"
    not_a_store.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match=r"garbage\.sqlite"):
        seed_copy(not_a_store, tmp_path / "other" / "warehouse.sqlite")
    assert not (tmp_path / "other" / "warehouse.sqlite").exists()


def test_customers_forgotten_since_a_snapshot_are_deleted_from_a_copy_started_from_it(
    replica: Replica,
) -> None:
    wh, _, follower = replica
    profiles = [
        {**profile_to_dict(new_profile(c, is_anonymous=False)), "kind": KIND_PROFILE}
        for c in ("c1", "c2")
    ]
    follower._apply(
        [
            Message(_event("c1"), 0),
            Message(_event("c2"), 1),
            *(
                Message(orjson.dumps(p), i, topic="profiles.updates")
                for i, p in enumerate(profiles)
            ),
        ]
    )
    assert purge_forgotten(wh, frozenset()) == []
    assert purge_forgotten(wh, {sha256_hex("c1"), sha256_hex("someone-else")}) == ["c1"]
    assert not any(wh.count_customer_rows(["c1"], [], "c1").values())
    assert wh.count_customer_rows(["c2"], [], "c2")["profiles"] == 1
    assert wh.counts()["events"] == 1


def _profile(customer: str) -> bytes:
    profile = profile_to_dict(new_profile(customer, is_anonymous=False))
    return orjson.dumps({**profile, "kind": KIND_PROFILE})


def _dead_letter(offset: int, raw: str, key: str = "k") -> bytes:
    return orjson.dumps({**make_dead_letter(offset, raw, key=key), "kind": KIND_DEAD_LETTER})


def _alert(subject: str) -> bytes:
    alert = Alert("bot_identity", subject, 500.0, 100.0, "warning", 1)
    return orjson.dumps({**alert_record(alert), "kind": KIND_ALERT})


def test_a_forgotten_customers_dead_letters_and_alerts_are_erased_and_not_written_back(
    replica: Replica,
) -> None:
    """Dead letters carry a key and the raw text, alerts a subject; the processor's erasure
    deletes them by those (a device's under its anonymous profile's tombstone), and so does a
    replica, which also drops the ones it reads after the erasure."""
    wh, forgotten, follower = replica
    raw = '{"type": "identify", "anonymousId": "D", "traits": {"email": "x@example.com"}}'
    follower._apply(
        [
            Message(_dead_letter(1, raw, key="D"), 0, topic="events.dlq"),
            Message(_dead_letter(2, '{"userId": "Y"}', key="Y"), 1, topic="events.dlq"),
            Message(_alert("D"), 0, topic="alerts"),
            Message(_alert("Y"), 1, topic="alerts"),
        ]
    )
    # forget X, who used device D: the tombstones of D's anonymous profile and of X's
    forgotten.update(sha256_hex(k) for k in ("X", anonymous_customer_id("D")))
    updates = "profiles.updates"
    follower._apply(
        [
            Message(None, 0, topic=updates, key=b"anon:D"),
            Message(None, 1, topic=updates, key=b"X"),
        ]
    )
    assert wh.query("SELECT message_key FROM dead_letters")["message_key"].tolist() == ["Y"]
    assert wh.query("SELECT subject FROM alerts")["subject"].tolist() == ["Y"]
    # read late (a new replica, another topic's lag): by key, by the ids in the JSON, by a
    # quoted id in text that is not JSON, and by an alert's subject
    follower._apply(
        [
            Message(_dead_letter(3, raw, key="D"), 2, topic="events.dlq"),
            Message(_dead_letter(4, '{"userId": "X"}', key="k"), 3, topic="events.dlq"),
            Message(_dead_letter(5, '{"previousId": "D"}', key="k"), 4, topic="events.dlq"),
            Message(_dead_letter(6, '{"userId": "X", "tr', key="k"), 5, topic="events.dlq"),
            Message(_dead_letter(7, '{"userId": "Z"}', key="k"), 6, topic="events.dlq"),
            Message(_alert("X"), 2, topic="alerts"),
            Message(_alert("D"), 3, topic="alerts"),
        ]
    )
    letters = "SELECT dead_letter_id FROM dead_letters ORDER BY dead_letter_id"
    assert wh.query(letters)["dead_letter_id"].tolist() == ["events.raw:0:2", "events.raw:0:7"]
    assert wh.query("SELECT subject FROM alerts")["subject"].tolist() == ["Y"]
    assert follower.dropped == 6


def test_a_record_whose_kind_is_not_text_is_dropped_and_the_batch_applied(
    replica: Replica,
) -> None:
    wh, forgotten, follower = replica
    forgotten.add(sha256_hex("someone"))  # the list is checked for the batch's records
    follower._apply(
        [
            Message(b'{"kind": ["event"]}', 0, topic="alerts"),
            Message(b'{"kind": {"a": 1}}', 1, topic="alerts"),
            Message(_event("c1"), 0),
        ]
    )
    assert wh.counts()["events"] == 1
    assert (follower.applied, follower.dropped) == (1, 2)
    assert wh.replica_positions()[("alerts", 0)] == 2


def test_the_list_is_read_again_for_a_batch_with_an_erasure(tmp_path: Path) -> None:
    """The list grew before the erasure was sent, but a replica's copy of it is re-read only
    every few seconds: an erasure makes it re-read now (as the processor does), so the
    customer's records read after it, in that batch or later ones, are not written back."""
    published: set[str] = set()  # what forget wrote
    cached: set[str] = set()  # what the replica last read
    fresh_reads = []

    def suppressed(*, fresh: bool = False) -> frozenset[str]:
        fresh_reads.append(fresh)
        if fresh:
            cached.clear()
            cached.update(published)
        return frozenset(cached)

    with LocalWarehouse(tmp_path / "replica.sqlite") as wh:
        follower = StoreFollower(Settings(home=tmp_path), "127.0.0.1:9", wh, suppressed=suppressed)
        follower._apply([Message(_profile("c1"), 0, topic="profiles.updates", key=b"c1")])
        assert fresh_reads == [False]
        published.add(sha256_hex("c1"))  # forget c1: the list, then the erasure
        follower._apply(
            [
                Message(None, 1, topic="profiles.updates", key=b"c1"),
                Message(_event("c1"), 0),  # sent just before the erasure
            ]
        )
        follower._apply([Message(_event("c1"), 1)])  # read later, on another topic
        follower._apply([Message(_event("c2"), 2)])
        follower.close()
        assert fresh_reads == [False, True, False, False]
        assert not any(wh.count_customer_rows(["c1"], [], "c1").values())
        assert wh.counts()["events"] == 1  # c2's


def test_a_restarted_replica_deletes_customers_forgotten_while_it_was_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the suppression list tells: the erasure's tombstones may be compacted away by the
    time the replica reads the topics again (``delete.retention.ms``)."""
    path = tmp_path / "copy.sqlite"
    with LocalWarehouse(path) as wh:
        follower = StoreFollower(Settings(home=tmp_path), "127.0.0.1:9", wh)
        follower._apply(
            [
                Message(_event("c1"), 0),
                Message(_event("c2"), 1),
                Message(_profile("c1"), 0, topic="profiles.updates"),
                Message(_profile("c2"), 1, topic="profiles.updates"),
            ]
        )
        follower.close()
    ids = frozenset({sha256_hex("c1")})  # c1 forgotten meanwhile
    monkeypatch.setattr(follow, "broker_address", lambda settings: "127.0.0.1:9")
    monkeypatch.setattr(follow, "suppression_source", lambda s, a: lambda fresh=False: ids)
    monkeypatch.setattr(StoreFollower, "start", lambda self: self)  # no thread, no broker
    restarted = follow.follow_topics(Settings(home=tmp_path), path)
    try:
        wh = restarted._warehouse
        assert not any(wh.count_customer_rows(["c1"], [], "c1").values())
        assert wh.count_customer_rows(["c2"], [], "c2")["profiles"] == 1
    finally:
        restarted.close()


def test_a_snapshot_whose_path_has_uri_characters_is_read(replica: Replica, tmp_path: Path) -> None:
    """A store opened read-only is opened by URI: '#', '?' and '%' in its path are escaped
    (unescaped, '#' or '?' ends the path, and SQLite opened, or made, another file)."""
    wh, _, follower = replica
    follower._apply([Message(_event("c1"), 0)])
    snapshot = wh.snapshot(tmp_path / "snaps #1?a=%41" / "replica.sqlite")
    assert seed_copy(snapshot, tmp_path / "copy.sqlite")
    with LocalWarehouse(snapshot, read_only=True) as read:
        assert read.counts()["events"] == 1
    with LocalWarehouse(tmp_path / "copy.sqlite") as copy:
        assert copy.counts()["events"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "copy.sqlite",
        "replica.sqlite",
        "replica.sqlite-shm",
        "replica.sqlite-wal",
        "snaps #1?a=%41",
    ]
