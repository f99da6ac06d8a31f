"""The suppression list every machine shares: `forget` writes hashed ids to a compacted topic
that collectors and processors elsewhere read (real embedded broker)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from pipeline.broker import KEPT_FOREVER, client_config
from pipeline.gdpr import (
    SharedSuppressionList,
    forget,
    is_suppressed,
    load_suppressed,
    suppression_records,
)
from pipeline.pii import sha256_hex
from pipeline.runner import pipeline_run
from pipeline.settings import Settings
from pipeline.stores.local import LocalWarehouse

pytestmark = pytest.mark.integration


def test_a_customer_forgotten_on_one_machine_is_suppressed_on_another(settings: Settings) -> None:
    with pipeline_run(settings) as run:
        elsewhere = settings.model_copy(
            update={"home": settings.home.parent / "elsewhere", "broker": run.address}
        )
        shared = SharedSuppressionList(settings, run.address, refresh_in_background=False)
        try:
            assert shared(fresh=True) == frozenset()  # the topic exists but is empty
            # created compacted and never expiring, unlike the other topics (7 days)
            topic = ConfigResource(ConfigResource.Type.TOPIC, settings.topics.suppressions)
            admin = AdminClient(client_config(settings, run.address))
            created = admin.describe_configs([topic])[topic].result(10)
            assert {k: created[k].value for k in KEPT_FOREVER} == KEPT_FOREVER
            assert KEPT_FOREVER["cleanup.policy"] == "compact"
            # a reader that refreshes in the background (the collector's) never waits for it
            background = SharedSuppressionList(settings, run.address, ttl_s=0.2)
            with LocalWarehouse(elsewhere.home / "warehouse.sqlite") as wh:
                forget("cus_a", elsewhere, warehouse=wh)
            # what was read stays until the next refresh, or a fresh read (the processor's,
            # when an erasure reaches it)
            assert shared() == frozenset()
            assert is_suppressed(shared(fresh=True), customer_id="cus_a")
            assert not load_suppressed(settings)  # this machine's file knows nothing of it
            deadline = time.monotonic() + 20
            while not is_suppressed(background(), customer_id="cus_a"):
                assert time.monotonic() < deadline, "the background refresh never read it"
                time.sleep(0.05)
            background.close()

            # a second customer, with a device; then read incrementally from where it was
            with LocalWarehouse(elsewhere.home / "warehouse.sqlite") as wh:
                wh.write_identity_links(
                    [
                        {
                            "anonymous_id": "dev-b",
                            "customer_id": "cus_b",
                            "previous_customer_id": None,
                            "linked_ms": 1,
                            "via_message_id": "m1",
                            "merged_events": 0,
                        }
                    ]
                )
                forget("cus_b", elsewhere, warehouse=wh)
            ids = shared(fresh=True)
            assert is_suppressed(ids, customer_id="cus_b")
            assert is_suppressed(ids, anonymous_id="dev-b")  # their device's anonymous events
            assert ids == load_suppressed(elsewhere)  # the same hashes as the file it wrote

            # a reader started later reads the topic from its start
            late = SharedSuppressionList(settings, run.address)
            try:
                assert late() == ids
            finally:
                late.close()

            # a tombstone (an operator lifting a suppression) removes the id
            producer = Producer(client_config(settings, run.address))
            producer.produce(settings.topics.suppressions, key=sha256_hex("cus_a"), value=None)
            assert producer.flush(10) == 0
            assert not is_suppressed(shared(fresh=True), customer_id="cus_a")
            assert is_suppressed(shared(), customer_id="cus_b")
        finally:
            shared.close()


def test_suppression_records_are_one_per_hashed_id() -> None:
    records = suppression_records("cus_1", ["cus_1", "anon:d1"], "2026-11-28T00:00:00+00:00")
    assert [key for key, _ in records] == [sha256_hex("cus_1"), sha256_hex("anon:d1")]
    assert all(b"cus_1" not in value for _, value in records)  # pseudonyms only


def test_a_file_only_source_without_a_broker(settings: Settings, tmp_path: Path) -> None:
    from pipeline.gdpr import suppression_source

    with LocalWarehouse(tmp_path / "w.sqlite") as wh:
        forget("cus_z", settings, warehouse=wh)  # no broker: the file, and the state dir
    assert is_suppressed(suppression_source(settings)(), customer_id="cus_z")
