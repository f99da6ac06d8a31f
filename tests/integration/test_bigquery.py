"""The BigQuery warehouse with the real google-cloud-bigquery client.

Runs against a local bqemulator always, and against real BigQuery when credentials
(``GOOGLE_APPLICATION_CREDENTIALS``) or ``PIPELINE_BIGQUERY__PROJECT`` are configured,
in a throw-away dataset deleted afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipeline.gdpr import forget, verify_forgotten
from pipeline.settings import BigQuerySettings, Settings
from pipeline.stores.bigquery import BigQueryWarehouse
from pipeline.stores.local import LocalWarehouse
from pipeline.testing import T0_MS, make_dead_letter

pytestmark = pytest.mark.integration

_DAY = 86_400_000


def _real_bigquery_reason() -> str | None:
    """Why the real-BigQuery run is skipped, or None when it is configured."""
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") or os.environ.get(
        "PIPELINE_BIGQUERY__PROJECT"
    ):
        return None
    return (
        "real BigQuery not configured: "
        "set GOOGLE_APPLICATION_CREDENTIALS or PIPELINE_BIGQUERY__PROJECT"
    )


@pytest.fixture(scope="module", params=["emulator", "bigquery"])
def warehouse(request: pytest.FixtureRequest) -> Iterator[BigQueryWarehouse]:
    dataset = f"pipeline_test_{uuid.uuid4().hex[:8]}"
    if request.param == "emulator":
        from bigquery_emulator import running_emulator

        with running_emulator() as url:
            cfg = BigQuerySettings(
                enabled=True,
                project="test-project",
                dataset=dataset,
                api_endpoint=url,
                retry_deadline_s=20,
            )
            with BigQueryWarehouse(cfg) as wh:
                wh.ensure_schema({"events": 400, "dead_letters": 30, "sent_emails": 90})
                yield wh
        return
    reason = _real_bigquery_reason()
    if reason:
        print(f"\nSKIP real BigQuery: {reason}")
        pytest.skip(reason)
    cfg = Settings().bigquery.model_copy(update={"enabled": True, "dataset": dataset})
    with BigQueryWarehouse(cfg) as wh:
        try:
            wh.ensure_schema({"events": 400})
            yield wh
        finally:
            wh.client.delete_dataset(wh.dataset_id, delete_contents=True, not_found_ok=True)


def _event(mid: str, customer: str, ts: int = T0_MS, **extra: Any) -> dict[str, Any]:
    return {
        "message_id": mid,
        "customer_id": customer,
        "type": "track",
        "name": "Product Viewed",
        "timestamp_ms": ts,
        "ingested_ms": ts + 5,
        "anonymous_id": None,
        "user_id": customer,
        "product_id": "p1",
        "price": 19.5,
        "traits": {"email": " Ann@Example.com "},
        **extra,
    }


def _profile(customer: str, version: int, cis: float) -> dict[str, Any]:
    return {
        "customer_id": customer,
        "is_anonymous": False,
        "merged_into": None,
        "event_count": version,
        "cis": cis,
        "intent_stage": "browsing",
        "revenue_total": 0.0,
        "order_count": 0,
        "last_seen_ms": T0_MS,
        "version": version,
        "updated_ms": T0_MS + version,
        "traits": {"email": "ann@example.com"},
    }


def test_tables_created_partitioned_and_clustered(warehouse: BigQueryWarehouse) -> None:
    names = {t.table_id for t in warehouse.client.list_tables(warehouse.dataset_id)}
    assert {
        "events",
        "profiles",
        "dead_letters",
        "identity_links",
        "segment_changes",
        "sent_emails",
    } <= names
    events = warehouse.client.get_table(warehouse.table_id("events"))
    assert events.time_partitioning is not None
    assert events.time_partitioning.field == "event_date"
    assert events.clustering_fields == ["customer_id"]
    assert {f.name: f.field_type for f in events.schema}["event_ts_ms"] in ("INTEGER", "INT64")
    assert warehouse.partition_expiration_days("events") == 400


def test_events_inserted_once_when_a_batch_is_retried(warehouse: BigQueryWarehouse) -> None:
    batch = [_event(f"once-{i}", "c-once", T0_MS + i * _DAY) for i in range(5)]
    warehouse.write_events(batch)
    warehouse.write_events(batch)  # the same insertIds again, as after a failed checkpoint
    warehouse.write_events([*batch[2:], _event("once-5", "c-once")])
    df = warehouse.query(
        "SELECT message_id, event_date, price, payload FROM events WHERE customer_id = @c "
        "ORDER BY message_id",
        {"c": "c-once"},
    )
    assert isinstance(df, pd.DataFrame)
    assert list(df["message_id"]) == [f"once-{i}" for i in range(6)]
    assert str(df["event_date"].iloc[1]) == "2024-01-02"
    assert "ann@example.com" not in df["payload"].iloc[0].lower()
    assert "emailSha256" in df["payload"].iloc[0]


def _skip_on_streaming_buffer(warehouse: BigQueryWarehouse) -> None:
    if warehouse.settings.api_endpoint is None:
        pytest.skip("real BigQuery refuses DML on rows in the streaming buffer (up to 90 min)")


def test_anonymous_attribution_upgraded_on_merge(warehouse: BigQueryWarehouse) -> None:
    _skip_on_streaming_buffer(warehouse)
    anon = _event("up-1", "anon:dev-9", anonymous_id="dev-9", user_id=None)
    warehouse.write_events([anon])
    warehouse.write_events([{**anon, "customer_id": "c-up", "merged_from": "anon:dev-9"}])
    df = warehouse.query("SELECT customer_id FROM events WHERE message_id = 'up-1'")
    assert list(df["customer_id"]) == ["c-up"]


def test_two_copies_in_one_batch_keep_the_customer_and_the_first_arrivals_lineage(
    warehouse: BigQueryWarehouse,
) -> None:
    lineage = {"parsed_ms": T0_MS + 10, "stitched_ms": T0_MS + 12, "scored_ms": T0_MS + 15}
    anon = _event("two-1", "anon:dev-8", anonymous_id="dev-8", user_id=None, **lineage)
    again = {
        **anon,
        "customer_id": "c-two",
        "merged_from": "anon:dev-8",
        **{k: v + 60_000 for k, v in lineage.items()},
    }
    warehouse.write_events([again, anon])  # the re-attributed copy first
    df = warehouse.query(
        "SELECT customer_id, parsed_ms, stitched_ms, scored_ms FROM events "
        "WHERE message_id = 'two-1'"
    )
    assert df.to_dict("records") == [{"customer_id": "c-two", **lineage}]


def test_profiles_merged_and_older_version_loses(warehouse: BigQueryWarehouse) -> None:
    warehouse.write_profiles([_profile("c-p1", 2, 10.0), _profile("c-p2", 1, 5.0)])
    warehouse.write_profiles([_profile("c-p1", 1, 99.0), _profile("c-p2", 3, 7.0)])
    warehouse.write_profiles([_profile("c-p2", 3, 7.0)])
    df = warehouse.query(
        "SELECT customer_id, version, cis FROM profiles WHERE customer_id LIKE 'c-p%' "
        "AND is_anonymous = 0 ORDER BY customer_id"
    )
    assert df.to_dict("records") == [
        {"customer_id": "c-p1", "version": 2, "cis": 10.0},
        {"customer_id": "c-p2", "version": 3, "cis": 7.0},
    ]


def test_other_tables_idempotent(warehouse: BigQueryWarehouse) -> None:
    failure = {
        "topic": "events.raw",
        "partition": 0,
        "offset": 7,
        "reason": "not_json",
        "detail": "x",
        "ingested_ms": T0_MS,
        "failed_ms": T0_MS,
        "raw_text": "{",
        "raw_b64": "ew==",
        "key": "dev-1",
    }
    link = {
        "anonymous_id": "dev-l",
        "customer_id": "c-l",
        "previous_customer_id": None,
        "linked_ms": T0_MS,
        "via_message_id": "m",
        "merged_events": 2,
    }
    change = {
        "customer_id": "c-l",
        "segment": "vip",
        "change": "enter",
        "at_ms": T0_MS,
        "profile_version": 4,
    }
    sent = {
        "email_id": "e-1",
        "customer_id": "c-l",
        "campaign_id": "wk1",
        "subject": "Hi",
        "to": "Ann@example.com",
        "sent_ms": T0_MS,
        "html": "<p>",
        "text": "p",
        "snapshot": {"v": 1},
    }
    for _ in range(2):
        warehouse.write_dead_letters([failure])
        warehouse.write_identity_links([link])
        warehouse.write_segment_changes([change])
        warehouse.write_sent_emails([sent])
    warehouse.write_identity_links([{**link, "customer_id": "c-old", "linked_ms": T0_MS - 1}])
    counts = warehouse.counts()
    assert counts["dead_letters"] == 1
    assert counts["segment_changes"] == 1
    assert counts["sent_emails"] == 1
    assert warehouse.scalar("SELECT customer_id FROM identity_links") == "c-l"


def test_forget_deletes_every_row(warehouse: BigQueryWarehouse) -> None:
    _skip_on_streaming_buffer(warehouse)
    warehouse.write_events(
        [_event("f-1", "c-f"), _event("f-2", "anon:dev-f", anonymous_id="dev-f", user_id=None)]
    )
    warehouse.write_profiles([_profile("c-f", 1, 1.0)])
    keys, anon = ["c-f", "anon:dev-f"], ["dev-f"]
    assert sum(warehouse.count_customer_rows(keys, anon, "c-f").values()) == 3
    warehouse.delete_customer(keys, anon, "c-f")
    assert set(warehouse.count_customer_rows(keys, anon, "c-f").values()) == {0}


def test_forget_keeps_a_shared_devices_other_customer_and_reads_dead_letters_as_json(
    warehouse: BigQueryWarehouse,
) -> None:
    _skip_on_streaming_buffer(warehouse)
    warehouse.write_events(
        [
            _event("s-1", "c-s", anonymous_id="dev-s"),
            _event("s-2", "c-other", anonymous_id="dev-s", user_id="c-other"),
            _event("s-3", "anon:dev-s", anonymous_id="dev-s", user_id=None),
        ]
    )

    def letter(offset: int, raw: str) -> dict[str, Any]:
        return make_dead_letter(offset, raw, key="k-s", partition=9)

    warehouse.write_dead_letters(
        [
            letter(1, '{"userId": "c\\u002ds"}'),  # "c-s", escaped
            letter(2, '{"userId": "c-x", "properties": {"sku": "c-s"}}'),  # not theirs
            letter(3, '{"broken": "c-s"'),  # unreadable: by its text
        ]
    )
    keys, anon = ["c-s", "anon:dev-s"], ["dev-s"]
    assert warehouse.count_customer_rows(keys, anon, "c-s")["dead_letters"] == 2
    warehouse.delete_customer(keys, anon, "c-s")
    assert set(warehouse.count_customer_rows(keys, anon, "c-s").values()) == {0}
    left = warehouse.query("SELECT message_id FROM events WHERE message_id LIKE 's-%'")
    assert list(left["message_id"]) == ["s-2"]
    letters = warehouse.query("SELECT raw_text FROM dead_letters WHERE message_key = 'k-s'")
    assert list(letters["raw_text"]) == ['{"userId": "c-x", "properties": {"sku": "c-s"}}']
    # a customer with no devices: an event with an empty anonymousId is nobody's device
    warehouse.write_dead_letters([letter(4, '{"anonymousId": ""}')])
    warehouse.delete_customer(["c-none"], [], "c-none")
    letters = warehouse.query("SELECT raw_text FROM dead_letters WHERE message_key = 'k-s'")
    assert '{"anonymousId": ""}' in list(letters["raw_text"])


def test_gdpr_forget_and_verify_with_bigquery(warehouse: BigQueryWarehouse, tmp_path: Path) -> None:
    _skip_on_streaming_buffer(warehouse)
    settings = Settings(home=tmp_path)
    anon = _event("g-1", "anon:dev-g", anonymous_id="dev-g", user_id=None)
    warehouse.write_events([anon, _event("g-2", "c-g", anonymous_id="dev-g")])
    warehouse.write_profiles([_profile("c-g", 1, 1.0)])
    with LocalWarehouse(tmp_path / "w.sqlite") as local:
        local.write_events([anon])
        report = forget("c-g", settings, warehouse=local, bigquery=warehouse)
        assert report.devices == 1
        assert report.deleted["bigquery.events"] == 2
        left = verify_forgotten("c-g", settings, warehouse=local, bigquery=warehouse)
    assert set(left.values()) == {0} and "bigquery.profiles" in left


def test_retention_sets_partition_expiration(warehouse: BigQueryWarehouse) -> None:
    warehouse.set_partition_expiration("sent_emails", 7)
    assert warehouse.partition_expiration_days("sent_emails") == 7


def test_alerts_inserted_once(warehouse: BigQueryWarehouse) -> None:
    from pipeline.anomaly import Alert, alert_record

    alerts = [
        alert_record(Alert("volume_spike", "Product Viewed/web", 90, 4, "critical", T0_MS), 3),
        alert_record(Alert("bot_identity", "bot-1", 61, 60, "warning", T0_MS + 1), 0),
    ]
    warehouse.write_alerts(alerts)
    warehouse.write_alerts([*alerts, {**alerts[0], "partition": 1}])  # a replay, another partition
    df = warehouse.query(
        "SELECT kind, subject, severity, observed, expected, at_ms, source_partition "
        "FROM alerts ORDER BY at_ms"
    )
    assert df.to_dict("records") == [
        {
            "kind": "volume_spike",
            "subject": "Product Viewed/web",
            "severity": "critical",
            "observed": 90.0,
            "expected": 4.0,
            "at_ms": T0_MS,
            "source_partition": 3,
        },
        {
            "kind": "bot_identity",
            "subject": "bot-1",
            "severity": "warning",
            "observed": 61.0,
            "expected": 60.0,
            "at_ms": T0_MS + 1,
            "source_partition": 0,
        },
    ]
