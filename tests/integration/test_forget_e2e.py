"""`pipeline forget` against a running processor (real broker): the customer leaves the
processor's state stores and their changelog topics too, and their later events are dropped.

``forget`` runs as on another machine (a home of its own, the broker configured): the
processor learns of it through the broker alone, not through a shared file."""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource
from topic_reader import read_topic

from pipeline.broker import client_config
from pipeline.gdpr import CONTROL_HEADER, ERASE, forget, suppression_path, verify_forgotten
from pipeline.identity import anonymous_customer_id
from pipeline.runner import make_producer, pipeline_run, process_until_idle, produce_messages
from pipeline.settings import Settings
from pipeline.simulate import RawMessage, SimulationConfig, simulate
from pipeline.stores.local import LocalWarehouse
from pipeline.sync import CrmRecord, KafkaRecordProducer

pytestmark = pytest.mark.integration

END = datetime(2026, 11, 1, tzinfo=UTC)


def _late_event(n: int, *, user_id: str, device: str | None) -> RawMessage:
    """A valid event of the customer sent after they were forgotten (device or server-side)."""
    payload: dict[str, Any] = {
        "type": "track",
        "event": "Product Viewed",
        "messageId": f"after-forget-{n}",
        "userId": user_id,
        "timestamp": datetime.now(UTC).isoformat(),
        "context": {"sessionId": "s-late", "device": {"type": "mobile"}},
        "properties": {"product_id": "P00001"},
    }
    if device is not None:
        payload["anonymousId"] = device
    key = device or user_id
    return RawMessage(
        key=key.encode(),
        value=orjson.dumps(payload),
        kind="valid",
        message_id=payload["messageId"],
        true_customer_id=user_id,
        malformed_reason=None,
        timestamp_ms=0,
        delivered_ms=0,
    )


def _latest_by_key(settings: Settings, address: str, topic: str) -> dict[bytes, bytes | None]:
    latest: dict[bytes, bytes | None] = {}
    for key, value in read_topic(settings, address, topic):
        if key is not None:
            latest[key] = value
    return latest


def test_forget_erases_state_changelogs_and_later_events(settings: Settings) -> None:
    with pipeline_run(settings) as run:
        admin_host = settings.model_copy(
            update={"home": settings.home.parent / "admin-host", "broker": run.address}
        )
        sim = simulate(SimulationConfig(events=800, seed=11, end=END, days=4), run.catalog)
        valid = {m.message_id for m in sim.messages if m.kind == "valid" and m.message_id}
        found: dict[str, Any] = {}

        def wait_for(done: Any, what: str, limit: float = 120) -> None:
            deadline = time.monotonic() + limit
            while not done():
                assert time.monotonic() < deadline, f"{what}: {run.metrics.progress()}"
                time.sleep(0.2)

        def feed() -> None:
            produce_messages(settings, run.address, sim.messages)
            events = "SELECT COUNT(*) FROM events"
            wait_for(lambda: run.warehouse.scalar(events) == len(valid), "events stored")
            # the customer with the most devices, each with an anonymous profile before login
            row = run.warehouse.query(
                "SELECT customer_id, COUNT(DISTINCT anonymous_id) AS n FROM identity_links "
                "GROUP BY customer_id ORDER BY n DESC, customer_id LIMIT 1"
            ).iloc[0]
            customer = str(row["customer_id"])
            with LocalWarehouse(settings.warehouse_path) as wh:
                devices = sorted(wh.linked_devices(customer))
                report = forget(customer, admin_host, warehouse=wh)
            found.update(customer=customer, devices=devices, report=report)
            late = [
                _late_event(1, user_id=customer, device=devices[0]),
                _late_event(2, user_id=customer, device=None),
            ]
            found["late"] = len(late)
            produce_messages(settings, run.address, late)
            # a CRM re-import names them too: only stage 2 sees it, and must not revive them
            crm = KafkaRecordProducer(settings, run.address)
            row = {"customer_id": customer, "email": "back@example.com", "updated_at": "2026-11-02"}
            crm.send(customer, CrmRecord.parse(row, "crm").to_message("crm"))
            crm.flush()
            # a request that cannot be carried out is a typed dead letter, not a stopped stream
            producer = make_producer(settings, run.address)
            producer.produce(
                settings.topics.raw,
                key=b"dev-x",
                value=b"{not json",
                headers=[(CONTROL_HEADER, ERASE)],
            )
            assert producer.flush(10) == 0
            keys = 1 + len(devices)
            wait_for(
                lambda: (
                    run.metrics.profiles_erased >= keys + 1
                    and run.metrics.raw_in >= len(sim.messages) + keys + len(late) + 1
                    and run.metrics.suppressed >= len(late) + 1
                ),
                "erasure carried out",
            )

        process_until_idle(run, expected_raw=len(sim.messages), feed=feed, timeout_s=300)
        customer, devices = found["customer"], found["devices"]
        assert len(devices) >= 2, devices  # the chosen customer has state under several keys
        assert found["report"].processor_state == (
            f"erasure sent to the processor for {1 + len(devices)} keys"
        )
        m = run.metrics
        assert m.erasures == 1 + len(devices)
        # each key's anonymous profile, and the customer's own (keyed by their user id)
        assert m.profiles_erased == 2 + len(devices)
        assert m.suppressed == found["late"] + 1  # the late events and the CRM record

        bad = run.warehouse.query(
            "SELECT message_key, detail FROM dead_letters WHERE reason = ?", ("bad_control",)
        )
        assert list(bad["message_key"]) == ["dev-x"], bad
        assert "erasure request not carried out" in bad["detail"][0]

        # the warehouse holds nothing of theirs, though the stream wrote after `forget` deleted
        assert not suppression_path(settings).exists()  # the processor's machine has no file
        left = verify_forgotten(customer, admin_host, warehouse=run.warehouse)
        assert not any(left.values()), left

        # the changelog topics that restore the state stores end in a tombstone for every key
        # of the customer's state (dedupe ids apart: message ids, expired by the window)
        names = [bytes(customer, "utf-8"), *(bytes(d, "utf-8") for d in devices)]
        admin = AdminClient(client_config(settings, run.address))
        changelogs = [t for t in admin.list_topics(timeout=10).topics if "changelog" in t]
        assert len(changelogs) >= 2, changelogs  # stage 1's and stage 2's stores
        theirs: dict[str, dict[bytes, bytes | None]] = defaultdict(dict)
        for topic in changelogs:
            for key, value in _latest_by_key(settings, run.address, topic).items():
                if any(n in key for n in names) and b"seen:" not in key:
                    theirs[topic][key] = value
        kept = {t: [k for k, v in keys.items() if v is not None] for t, keys in theirs.items()}
        assert not any(kept.values()), kept
        # not vacuous: the customer had a profile and their devices links and history
        erased_keys = [k for keys in theirs.values() for k in keys]
        assert any(b"profile" in k and bytes(customer, "utf-8") in k for k in erased_keys)
        assert any(b"linked" in k for k in erased_keys), erased_keys

        # the profile topic, compacted, ends in a tombstone for each of their profiles (readers
        # learn the profile is gone, and compaction can drop the key), after their profiles
        updates = read_topic(settings, run.address, settings.topics.profiles)
        for key in (customer, *(anonymous_customer_id(d) for d in devices)):
            theirs_updates = [value for k, value in updates if k == key.encode()]
            assert theirs_updates and theirs_updates[-1] is None, key
        first = next(value for k, value in updates if k == customer.encode())
        assert first is not None and orjson.loads(first)["kind"] == "profile"
        described = ConfigResource(ConfigResource.Type.TOPIC, settings.topics.profiles)
        created = admin.describe_configs([described])[described].result(10)
        assert created["cleanup.policy"].value == "compact"
        # so does the links topic, for each device linked to them (and every device erased)
        links = read_topic(settings, run.address, settings.topics.identities)
        linked = {d for d in devices if any(k == d.encode() and v is not None for k, v in links)}
        assert linked, devices  # not vacuous: their devices were linked to them
        for device in devices:
            assert [value for k, value in links if k == device.encode()][-1] is None, device
        described = ConfigResource(ConfigResource.Type.TOPIC, settings.topics.identities)
        created = admin.describe_configs([described])[described].result(10)
        assert created["cleanup.policy"].value == "compact"
