"""Retention in the local warehouse; forget and verify on a warehouse filled by a replay."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.catalog import load_catalog
from pipeline.errors import StoreError
from pipeline.gdpr import audit_path, forget, is_suppressed, load_suppressed, verify_forgotten
from pipeline.identity import is_anonymous
from pipeline.retention import apply_retention
from pipeline.settings import RetentionSettings, Settings
from pipeline.simulate import SimulationConfig, simulate
from pipeline.stores.local import LocalWarehouse
from pipeline.testing import T0_MS, make_dead_letter, replay

_DAY = 86_400_000


@pytest.fixture
def warehouse(tmp_path: Path) -> Iterator[LocalWarehouse]:
    with LocalWarehouse(tmp_path / "w.sqlite") as wh:
        yield wh


def _event(mid: str, ts: int) -> dict[str, Any]:
    return {
        "message_id": mid,
        "customer_id": "c1",
        "type": "track",
        "name": "Order Completed",
        "timestamp_ms": ts,
        "ingested_ms": ts,
    }


def test_retention_deletes_only_expired_rows(tmp_path: Path, warehouse: LocalWarehouse) -> None:
    now = datetime.fromtimestamp((T0_MS + 100 * _DAY) / 1000, UTC)
    warehouse.write_events([_event("old", T0_MS), _event("new", T0_MS + 95 * _DAY)])
    warehouse.write_dead_letters(
        [
            {
                "topic": "t",
                "partition": 0,
                "offset": i,
                "reason": "not_json",
                "detail": "",
                "ingested_ms": ts,
                "failed_ms": ts,
                "raw_text": "x",
                "raw_b64": "eA==",
            }
            for i, ts in enumerate((T0_MS, T0_MS + 99 * _DAY))
        ]
    )
    warehouse.write_sent_emails(
        [
            {
                "email_id": f"e{i}",
                "customer_id": "c1",
                "campaign_id": "k",
                "subject": "s",
                "to": "a@b.c",
                "sent_ms": ts,
            }
            for i, ts in enumerate((T0_MS, T0_MS + 50 * _DAY))
        ]
    )
    settings = Settings(
        home=tmp_path,
        retention=RetentionSettings(events_days=30, dead_letters_days=7, sent_emails_days=None),
    )
    assert apply_retention(warehouse, settings, now) == {
        "events": 1,
        "dead_letters": 1,
        "sent_emails": 0,
    }
    assert list(warehouse.query("SELECT message_id FROM events")["message_id"]) == ["new"]
    assert warehouse.counts()["dead_letters"] == 1
    assert apply_retention(warehouse, settings, now)["events"] == 0


def _filled(warehouse: LocalWarehouse, settings: Settings) -> Any:
    catalog = load_catalog(settings.catalog_path)
    sim = simulate(
        SimulationConfig(events=3000, seed=7, end=datetime(2024, 3, 1, tzinfo=UTC)), catalog
    )
    result = replay(
        [(m.key, m.value) for m in sim.messages],
        catalog=catalog,
        settings=settings,
        now_ms=int(datetime(2024, 3, 1, tzinfo=UTC).timestamp() * 1000),
    )
    warehouse.write_events(result.events)
    warehouse.write_profiles(result.profiles.values())
    warehouse.write_identity_links(
        [{k: v for k, v in r.items() if k != "kind"} for r in result.links]
    )
    warehouse.write_dead_letters([f.to_dict() for f in result.failures])
    warehouse.write_segment_changes(result.segment_changes)
    return sim


def test_forget_ten_customers_everywhere(tmp_path: Path, warehouse: LocalWarehouse) -> None:
    settings = Settings(home=tmp_path / "home")
    sim = _filled(warehouse, settings)
    known = [c for c in sim.customers if c.is_known]
    by_events = warehouse.query(
        "SELECT customer_id, COUNT(*) AS n FROM events GROUP BY customer_id ORDER BY n DESC"
    )
    active = [c for c in by_events["customer_id"] if not is_anonymous(c)][:10]
    assert len(active) == 10
    before = warehouse.counts()["events"]
    for cid in active:
        report = forget(cid, settings, warehouse=warehouse)
        assert report.deleted["local.events"] > 0
        assert report.deleted["local.profiles"] >= 1
    assert warehouse.counts()["events"] < before
    suppressed = load_suppressed(settings)
    devices = {c.customer_id: c.anonymous_ids for c in known}
    for cid in active:
        assert set(verify_forgotten(cid, settings, warehouse=warehouse).values()) == {0}
        assert is_suppressed(suppressed, user_id=cid)
        assert all(is_suppressed(suppressed, anonymous_id=a) for a in devices[cid])
    others = [c.customer_id for c in known if c.customer_id not in active]
    assert not any(is_suppressed(suppressed, user_id=c) for c in others)
    assert sum(verify_forgotten(others[0], settings, warehouse=warehouse).values()) >= 0
    audit = [orjson.loads(line) for line in audit_path(settings).read_bytes().splitlines()]
    assert len(audit) == 10 and all(cid not in str(audit) for cid in active)
    assert all(cid not in suppression_text(settings) for cid in active)


def suppression_text(settings: Settings) -> str:
    return (settings.home / "suppression.jsonl").read_text()


def test_verify_finds_rows_left_behind(tmp_path: Path, warehouse: LocalWarehouse) -> None:
    settings = Settings(home=tmp_path / "home")
    forget("c1", settings, warehouse=warehouse)
    warehouse.write_events([_event("late", T0_MS)])  # written by a processor not yet suppressing
    assert verify_forgotten("c1", settings, warehouse=warehouse)["local.events"] == 1


def test_forget_deletes_alerts_that_name_the_customer(
    tmp_path: Path, warehouse: LocalWarehouse
) -> None:
    from pipeline.anomaly import Alert, alert_record

    settings = Settings(home=tmp_path / "home")
    warehouse.write_events([{**_event("e1", T0_MS), "anonymous_id": "dev-1", "user_id": "c1"}])
    bots = [Alert("bot_identity", who, 61, 60, "warning", T0_MS) for who in ("c1", "dev-1", "x")]
    skew = Alert("clock_skew", "web", 1e6, 3e5, "warning", T0_MS)
    warehouse.write_alerts([alert_record(a) for a in (*bots, skew)])
    report = forget("c1", settings, warehouse=warehouse)
    assert report.deleted["local.alerts"] == 2
    assert set(warehouse.query("SELECT subject FROM alerts")["subject"]) == {"x", "web"}
    assert verify_forgotten("c1", settings, warehouse=warehouse)["local.alerts"] == 0


def test_forget_deletes_the_customers_scheduled_emails(
    tmp_path: Path, warehouse: LocalWarehouse
) -> None:
    settings = Settings(home=tmp_path / "home")

    def scheduled(email_id: str, customer: str) -> dict[str, object]:
        return {
            "email_id": email_id,
            "customer_id": customer,
            "campaign_id": "cart_abandonment",
            "send_at_ms": T0_MS,
            "subject": "s",
            "html": "<p>h</p>",
            "text": "t",
            "snapshot": {"profile": {"version": 3}},
        }

    assert warehouse.write_scheduled_emails([scheduled("m1", "c1"), scheduled("m2", "c2")]) == 2
    assert warehouse.write_scheduled_emails([scheduled("m1", "c1")]) == 0  # once per email
    report = forget("c1", settings, warehouse=warehouse)
    assert report.deleted["local.scheduled_emails"] == 1
    assert [r["email_id"] for r in warehouse.scheduled_emails()] == ["m2"]
    assert warehouse.scheduled_emails()[0]["snapshot"] == {"profile": {"version": 3}}
    assert warehouse.still_scheduled(["m1", "m2"]) == {"m2"}
    assert verify_forgotten("c1", settings, warehouse=warehouse)["local.scheduled_emails"] == 0


@pytest.mark.parametrize("marker", [None, "crashed run"])
def test_forget_without_a_running_broker_deletes_the_processor_state(
    tmp_path: Path, warehouse: LocalWarehouse, marker: str | None
) -> None:
    """No broker to carry an erasure: the state belongs to an embedded broker that is gone
    (its topics with it), so it could never be restored and is deleted instead."""
    import subprocess
    import sys

    settings = Settings(home=tmp_path / "home")
    store = settings.state_dir / "pipeline-processor" / "default" / "events.attributed" / "0"
    store.mkdir(parents=True)
    (store / "000001.sst").write_bytes(b"profile of c1")
    if marker is not None:  # `pipeline up` was killed: its broker file names a dead process
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        (settings.home / "broker.json").write_text(
            f'{{"address": "127.0.0.1:1", "embedded_pid": {gone.pid}}}'
        )
    replica = settings.home / "state-0-1" / "rocksdb"  # a replica's of `pipeline up --replicas`
    replica.mkdir(parents=True)
    (replica / "000001.sst").write_bytes(b"profile of c1")
    report = forget("c1", settings, warehouse=warehouse)
    assert report.processor_state == "state directory deleted (no broker running)"
    assert not settings.state_dir.exists()
    assert not replica.parent.exists()
    audit = orjson.loads(audit_path(settings).read_bytes().splitlines()[-1])
    assert audit["processor_state"] == report.processor_state
    # nothing left to delete the second time
    assert forget("c1", settings, warehouse=warehouse).processor_state == "no processor state"


def on_d(mid: str, customer: str, user: str | None) -> dict[str, Any]:
    """An event of ``customer`` (signed in as ``user``, if any) on the shared device D."""
    return {**_event(mid, T0_MS), "customer_id": customer, "anonymous_id": "D", "user_id": user}


def test_forget_keeps_another_customers_rows_on_a_shared_device(
    tmp_path: Path, warehouse: LocalWarehouse
) -> None:
    """A signed in on device D once; B uses D now. B's events and link stay, D's anonymous
    events go, and so does everything of A's."""
    settings = Settings(home=tmp_path / "home")

    warehouse.write_events(
        [
            on_d("a1", "A", "A"),
            on_d("b1", "B", "B"),
            on_d("b2", "B", "B"),
            on_d("x1", "anon:D", None),
        ]
    )
    link = {"linked_ms": T0_MS, "via_message_id": "m", "merged_events": 0}
    warehouse.write_identity_links(
        [
            {**link, "anonymous_id": "D", "customer_id": "B", "previous_customer_id": "A"},
            {**link, "anonymous_id": "E", "customer_id": "A", "previous_customer_id": None},
        ]
    )
    forget("A", settings, warehouse=warehouse)
    left = warehouse.query("SELECT message_id, customer_id FROM events ORDER BY message_id")
    assert left.values.tolist() == [["b1", "B"], ["b2", "B"]]
    links = warehouse.query(
        "SELECT anonymous_id, customer_id, previous_customer_id FROM identity_links"
    )
    assert links.values.tolist() == [["D", "B", None]]
    assert set(verify_forgotten("A", settings, warehouse=warehouse).values()) == {0}


def test_forget_finds_dead_letters_by_the_ids_in_their_json_only(
    tmp_path: Path, warehouse: LocalWarehouse
) -> None:
    settings = Settings(home=tmp_path / "home")

    def letter(offset: int, raw: str, key: str = "k") -> dict[str, Any]:
        return make_dead_letter(offset, raw, key=key)

    warehouse.write_dead_letters(
        [
            letter(1, '{"type": "track", "userId": "jos\\u00e9"}'),  # escaped, as json.dumps does
            letter(2, '{"type": "track", "userId": 42}'),  # a number: refused by the schema
            letter(3, '{"userId": "C7", "properties": {"product_id": "42"}}'),  # not theirs
            letter(4, '{"broken": "42"', key="x"),  # unreadable: matched by its text
            # a CRM record or a control message names them in snake_case
            letter(5, '{"customer_id": "42", "email": "x@example.com", "updated_at": "x"}'),
            letter(6, '{"type": "track", "anonymousId": ""}'),  # no device of theirs
        ]
    )
    forget("josé", settings, warehouse=warehouse)
    forget("42", settings, warehouse=warehouse)
    left = warehouse.query("SELECT raw_text FROM dead_letters")["raw_text"].tolist()
    assert left == [
        '{"userId": "C7", "properties": {"product_id": "42"}}',
        '{"type": "track", "anonymousId": ""}',
    ]
    for who in ("josé", "42"):
        assert set(verify_forgotten(who, settings, warehouse=warehouse).values()) == {0}


def test_forget_keeps_a_shared_devices_events_of_a_customer_whose_id_looks_anonymous(
    tmp_path: Path, warehouse: LocalWarehouse
) -> None:
    """Only 'anon:' (in lower case) marks a device's anonymous events: 'Anon:Smith' is a
    customer of their own, whose events on a device the forgotten customer shared stay."""
    settings = Settings(home=tmp_path / "home")

    warehouse.write_events(
        [
            on_d("z1", "Z", "Z"),
            on_d("s1", "Anon:Smith", "Anon:Smith"),
            on_d("s2", "ANON:D", "ANON:D"),
            on_d("x1", "anon:D", None),
        ]
    )
    forget("Z", settings, warehouse=warehouse)
    left = warehouse.query("SELECT message_id FROM events ORDER BY message_id")
    assert left["message_id"].tolist() == ["s1", "s2"]


def test_a_line_cut_short_in_the_suppression_list_is_skipped_and_the_next_starts_anew(
    tmp_path: Path, warehouse: LocalWarehouse, caplog: pytest.LogCaptureFixture
) -> None:
    """A forget killed (or out of disk) mid-append leaves half a line: every reader of the
    list goes on with the other entries, and the next forget's entry is a line of its own."""
    from pipeline.gdpr import suppression_path, suppression_source

    settings = Settings(home=tmp_path / "home")
    forget("A", settings, warehouse=warehouse)
    with suppression_path(settings).open("ab") as f:
        f.write(b'{"customer": "ab12", "ids": ["cd')
    read = suppression_source(settings)
    with caplog.at_level("WARNING", logger="pipeline.gdpr"):
        assert is_suppressed(read(), user_id="A")
    assert "line 2 is not a suppression entry" in caplog.text
    forget("B", settings, warehouse=warehouse)
    assert is_suppressed(read(fresh=True), user_id="B")
    assert is_suppressed(load_suppressed(settings), user_id="A")
    assert set(verify_forgotten("B", settings, warehouse=warehouse).values()) == {0}
    assert len(suppression_path(settings).read_bytes().splitlines()) == 3


class _BigQueryBuffering:
    """Stands in for BigQuery whose rows about the customer are still in the streaming
    buffer (its DML delete fails on them) until ``ready``."""

    def __init__(self) -> None:
        self.ready = False

    def query(self, sql: str, params: Any = None) -> Any:
        import pandas as pd

        return pd.DataFrame({"anonymous_id": ["dev-1"]})

    def delete_customer(self, keys: Any, anonymous_ids: Any, user_id: str) -> dict[str, int]:
        if not self.ready:
            raise StoreError(
                "BigQuery forget in events failed: 400 UPDATE or DELETE statement over table "
                "p.d.events would affect rows in the streaming buffer, which is not supported"
            )
        return {"events": 2}


def test_a_failed_bigquery_delete_leaves_the_rest_done_and_audited(
    tmp_path: Path, warehouse: LocalWarehouse
) -> None:
    """BigQuery goes last: the processor's state is erased and the audit written (BigQuery
    pending) before forget fails for it; a later run deletes the BigQuery rows."""
    settings = Settings(home=tmp_path / "home")
    settings.state_dir.mkdir(parents=True)
    (settings.state_dir / "000001.sst").write_bytes(b"profile of c1")
    warehouse.write_events([{**_event("e1", T0_MS), "anonymous_id": "dev-1", "user_id": "c1"}])
    bq = _BigQueryBuffering()
    with pytest.raises(StoreError, match=r"streaming buffer.*run `pipeline forget` again"):
        forget("c1", settings, warehouse=warehouse, bigquery=bq)  # type: ignore[arg-type]
    assert not settings.state_dir.exists()
    assert is_suppressed(load_suppressed(settings), user_id="c1")
    assert set(verify_forgotten("c1", settings, warehouse=warehouse).values()) == {0}
    [audit] = [orjson.loads(line) for line in audit_path(settings).read_bytes().splitlines()]
    assert audit["bigquery"].startswith("pending")
    assert audit["deleted"]["local.events"] == 1 and "bigquery.events" not in audit["deleted"]
    assert audit["processor_state"] == "state directory deleted (no broker running)"
    assert "streaming buffer" not in str(audit)  # pseudonyms only, no error texts
    bq.ready = True
    report = forget("c1", settings, warehouse=warehouse, bigquery=bq)  # type: ignore[arg-type]
    assert (report.bigquery, report.deleted["bigquery.events"]) == ("deleted", 2)
    assert orjson.loads(audit_path(settings).read_bytes().splitlines()[-1])["bigquery"] == "deleted"
