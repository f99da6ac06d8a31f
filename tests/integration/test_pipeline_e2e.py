"""Simulator → embedded broker → processor → stores, measured against the simulator's truth."""

from __future__ import annotations

import base64
import dataclasses
import gc
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from topic_reader import read_topic

from pipeline.errors import ProcessingTimeout
from pipeline.runner import Run, pipeline_run, process_until_idle, produce_messages
from pipeline.settings import Settings
from pipeline.simulate import RawMessage, Simulation, SimulationConfig, simulate

pytestmark = pytest.mark.integration

END = datetime(2026, 11, 1, tzinfo=UTC)


@dataclass
class Outcome:
    run: Run
    sim: Simulation


def _viewed(user: str, message_id: str, at: datetime, **context: Any) -> RawMessage:
    """A valid server-side Product Viewed of ``user`` at ``at``, keyed as the collector would."""
    body = {
        "type": "track",
        "event": "Product Viewed",
        "messageId": message_id,
        "userId": user,
        "timestamp": at.isoformat(),
        "context": {"sessionId": "s1", "device": {"type": "desktop"}, **context},
        "properties": {"product_id": "P00001"},
    }
    return RawMessage(
        key=user.encode(),
        value=orjson.dumps(body),
        kind="valid",
        message_id=message_id,
        true_customer_id=user,
        malformed_reason=None,
        timestamp_ms=0,
        delivered_ms=0,
    )


@pytest.fixture(scope="module", params=["exactly-once", "at-least-once"])
def outcome(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Outcome]:
    """The whole simulation processed once per processing guarantee; every test below holds
    for both (at-least-once replays nothing here: no restart, see test_fault_injection)."""
    home = tmp_path_factory.mktemp("e2e") / "home"
    # stage 2's outputs in bursts (the default sends them one by one: other e2e tests)
    settings = Settings(
        home=home,
        partitions=4,
        commit_interval_s=0.3,
        processing_guarantee=request.param,
        outputs_max_delay_ms=100,
    )
    with pipeline_run(settings) as run:
        sim = simulate(SimulationConfig(events=6000, seed=11, end=END, days=10), run.catalog)
        process_until_idle(
            run,
            expected_raw=len(sim.messages),
            feed=lambda: produce_messages(settings, run.address, sim.messages) and None,
            timeout_s=300,
        )
        yield Outcome(run=run, sim=sim)


def _valid_unique_ids(sim: Simulation) -> set[str]:
    return {m.message_id for m in sim.messages if m.kind == "valid" and m.message_id}


def test_every_raw_message_was_consumed(outcome: Outcome) -> None:
    assert outcome.run.metrics.raw_in == len(outcome.sim.messages)


def test_the_loop_ran_with_the_collector_tuned_and_its_pauses_counted(
    outcome: Outcome,
) -> None:
    pauses = outcome.run.metrics.gc
    # young collections ran while 6,000 events went through (the tuned threshold is 10,000
    # net allocations: a few events' worth), each recorded with its duration
    assert pauses.counts[0] > 0 and pauses.seconds[0] > 0
    assert sum(pauses.buckets[0]) == pauses.counts[0]
    # and the collector is as it was once the loop ended
    assert gc.get_threshold() != (outcome.run.settings.gc_young_threshold, 20, 100)
    assert gc.get_freeze_count() == 0


def test_each_event_counts_once_in_the_latency_figures(outcome: Outcome) -> None:
    m = outcome.run.metrics
    assert m.events_merged > 0  # devices' histories were sent on to their customers
    # stored again, but their latency (since their first arrival) is not counted again
    assert m.events_stored == m.clean_out
    assert len(m.latencies_ms) == m.events_stored - m.events_merged


def test_every_duplicate_dropped_and_no_unique_event_dropped(outcome: Outcome) -> None:
    wh, sim = outcome.run.warehouse, outcome.sim
    stored = set(wh.query("SELECT message_id FROM events")["message_id"])
    expected = _valid_unique_ids(sim)
    assert stored == expected
    n_duplicates = sum(1 for m in sim.messages if m.kind == "duplicate")
    assert n_duplicates > 0
    assert outcome.run.metrics.duplicates_dropped == n_duplicates


def test_every_malformed_event_dead_lettered_with_its_reason(outcome: Outcome) -> None:
    wh, sim = outcome.run.warehouse, outcome.sim
    letters = wh.query("SELECT reason, raw_b64 FROM dead_letters")
    by_raw = {base64.b64decode(r.raw_b64): r.reason for r in letters.itertuples()}
    malformed = [m for m in sim.messages if m.kind == "malformed"]
    assert malformed, "the simulation injects malformed events"
    assert len(letters) == len(malformed)
    for m in malformed:
        raw = m.value[:65536]
        assert raw in by_raw, f"malformed message ({m.malformed_reason}) missing from dead letters"
        assert by_raw[raw] == m.malformed_reason


def test_stitched_identities_equal_true_links(outcome: Outcome) -> None:
    links = outcome.run.warehouse.query("SELECT anonymous_id, customer_id FROM identity_links")
    found = dict(zip(links["anonymous_id"], links["customer_id"], strict=True))
    assert found == outcome.sim.ground_truth.identity_links


def test_event_counts_per_customer_equal_truth(outcome: Outcome) -> None:
    wh, truth = outcome.run.warehouse, outcome.sim.ground_truth
    per_customer = wh.query("SELECT customer_id, COUNT(*) AS n FROM events GROUP BY customer_id")
    measured = dict(zip(per_customer["customer_id"], per_customer["n"].astype(int), strict=True))
    assert measured == truth.expected_event_counts
    profiles = wh.query("SELECT customer_id, event_count FROM profiles WHERE merged_into IS NULL")
    from_profiles = dict(
        zip(profiles["customer_id"], profiles["event_count"].astype(int), strict=True)
    )
    assert from_profiles == truth.expected_event_counts


def test_anonymous_profiles_of_linked_devices_are_retired(outcome: Outcome) -> None:
    wh, truth = outcome.run.warehouse, outcome.sim.ground_truth
    retired = wh.query(
        "SELECT customer_id, merged_into FROM profiles WHERE merged_into IS NOT NULL"
    )
    for row in retired.itertuples():
        device = row.customer_id.removeprefix("anon:")
        assert truth.identity_links[device] == row.merged_into


def test_profiles_carry_scores_and_affinities(outcome: Outcome) -> None:
    wh = outcome.run.warehouse
    known = wh.query(
        "SELECT customer_id FROM profiles WHERE merged_into IS NULL AND is_anonymous = 0 "
        "ORDER BY order_count DESC LIMIT 1"
    )["customer_id"][0]
    profile: dict[str, Any] = wh.get_profile(known)
    assert 0 < profile["cis"] <= 100
    assert profile["order_count"] > 0
    assert profile["category_affinity"]
    assert sum(profile["hour_of_week"].values()) > 0


def test_top_category_affinity_matches_hidden_preference(outcome: Outcome) -> None:
    """Most active customers' strongest affinity is one of their true top categories."""
    wh, sim = outcome.run.warehouse, outcome.sim
    prefs = {c.customer_id: c.category_prefs for c in sim.customers}
    active = wh.query(
        "SELECT customer_id FROM profiles WHERE merged_into IS NULL AND is_anonymous = 0 "
        "ORDER BY event_count DESC LIMIT 20"
    )["customer_id"]
    hits = Counter()
    for cid in active:
        affinity = wh.get_profile(cid)["category_affinity"]
        top = max(affinity, key=affinity.get)
        true_top3 = sorted(prefs[cid], key=prefs[cid].get, reverse=True)[:3]
        hits[top in true_top3] += 1
    assert hits[True] >= 0.8 * len(active)


def test_output_topics_hold_what_the_warehouse_holds(outcome: Outcome) -> None:
    """Stage 2 sends its outputs in bursts (settings.outputs_max_delay_ms): readers of
    events.clean get every clean event, and readers of profiles.updates, a table, the newest
    version of every profile, in fewer records than there were updates."""
    run = outcome.run
    wh, settings = run.warehouse, run.settings
    clean = [orjson.loads(v) for _, v in read_topic(settings, run.address, settings.topics.clean)]
    assert len(clean) == run.metrics.clean_out  # a re-attributed copy is a clean event too
    assert {e["message_id"] for e in clean} == set(
        wh.query("SELECT message_id FROM events")["message_id"]
    )
    updates = read_topic(settings, run.address, settings.topics.profiles)
    newest: dict[str, int] = {}
    for key, value in updates:
        assert key is not None and value is not None  # no erasure in this run
        version = orjson.loads(value)["version"]
        newest[key.decode()] = max(newest.get(key.decode(), 0), version)
    stored = wh.query("SELECT customer_id, version FROM profiles")
    assert newest == dict(zip(stored["customer_id"], stored["version"], strict=True))
    assert len(updates) < run.metrics.profile_updates  # the newest per checkpoint only


def test_stage_2_reads_stage_1_output_before_its_transaction_commits(settings: Settings) -> None:
    """With one checkpoint a minute, every event still reaches its profile within seconds:
    stage 2 reads stage 1's records as they are written (the default read_uncommitted).
    Waiting for stage 1's commit, nothing would reach stage 2 for the first minute."""
    settings = settings.model_copy(update={"commit_interval_s": 60.0})
    assert settings.consumer_isolation == "read_uncommitted"
    with pipeline_run(settings) as run:
        sim = simulate(SimulationConfig(events=400, seed=5, end=END, days=2), run.catalog)
        valid = {m.message_id for m in sim.messages if m.kind == "valid" and m.message_id}
        seen: dict[str, Any] = {}

        def feed() -> None:
            produce_messages(settings, run.address, sim.messages)
            started = time.monotonic()
            while time.monotonic() - started < 30:  # well before the first commit (60 s)
                stored = int(run.warehouse.scalar("SELECT COUNT(*) FROM events"))
                profiled = int(
                    run.warehouse.scalar("SELECT COALESCE(SUM(event_count), 0) FROM profiles")
                )
                seen.update(stored=stored, profiled=profiled)
                if stored == len(valid):
                    return
                time.sleep(0.2)

        process_until_idle(run, expected_raw=len(sim.messages), feed=feed, timeout_s=300)
    assert seen["stored"] == len(valid), seen
    assert seen["profiled"] >= len(valid), seen  # merged anonymous events count twice


def test_a_run_past_its_time_limit_raises_instead_of_passing_for_finished(
    settings: Settings,
) -> None:
    """A notebook or `pipeline report` must not present a half-processed run as a result."""
    with pipeline_run(settings) as run:
        sim = simulate(SimulationConfig(events=2000, seed=6, end=END, days=2), run.catalog)
        with pytest.raises(ProcessingTimeout, match=rf"of {len(sim.messages)} raw") as raised:
            process_until_idle(
                run,
                expected_raw=len(sim.messages),
                feed=lambda: produce_messages(settings, run.address, sim.messages),
                timeout_s=0.2,
                idle_s=0.05,
            )
        consumed = int(str(raised.value).split("consumed ")[1].split(" of")[0])
        assert consumed < len(sim.messages)  # a real shortfall, not the final idle wait


def test_bad_input_yields_typed_dead_letters_and_processing_goes_on(settings: Settings) -> None:
    now = datetime.now(UTC)
    good = (
        b'{"type":"track","event":"Product Viewed","messageId":"ok-%d","anonymousId":"dev-1",'
        b'"timestamp":"' + now.isoformat().encode() + b'","context":{"sessionId":"s1",'
        b'"device":{"type":"mobile"}},"properties":{"product_id":"P00001"}}'
    )
    bad = {
        "not_json": b"{this is not json",
        "not_utf8": b'{"type":"track","event":"\xff\xfe"}',
        "too_large": b'{"type":"track","pad":"' + b"x" * 40_000 + b'"}',
        "missing_identity": good.replace(b'"anonymousId":"dev-1",', b"") % 90,
        "schema_violation": good.replace(b'"product_id":"P00001"', b'"product_id":42') % 91,
        "timestamp_out_of_range": good.replace(now.isoformat().encode(), b"2100-01-01T00:00:00Z")
        % 92,
    }
    from pipeline.simulate import RawMessage

    messages = [
        RawMessage(
            key=b"dev-1",
            value=v,
            kind="malformed",
            message_id=None,
            true_customer_id="anon:dev-1",
            malformed_reason=r,
            timestamp_ms=0,
            delivered_ms=0,
        )
        for r, v in bad.items()
    ]
    messages += [
        RawMessage(
            key=b"dev-1",
            value=good % i,
            kind="valid",
            message_id=f"ok-{i}",
            true_customer_id="anon:dev-1",
            malformed_reason=None,
            timestamp_ms=0,
            delivered_ms=0,
        )
        for i in range(5)
    ]
    with pipeline_run(settings) as run:
        process_until_idle(
            run,
            expected_raw=len(messages),
            feed=lambda: produce_messages(settings, run.address, messages) and None,
            timeout_s=120,
        )
        letters = run.warehouse.query("SELECT reason, detail, schema_path FROM dead_letters")
        assert sorted(letters["reason"]) == sorted(bad)
        assert all(letters["detail"].str.len() > 0)
        violation = letters[letters["reason"] == "schema_violation"].iloc[0]
        assert "product_id" in violation["schema_path"]
        assert run.warehouse.get_profile("anon:dev-1")["event_count"] == 5
        dlq = read_topic(settings, run.address, "events.dlq")
        topic_reasons = [orjson.loads(value)["reason"] for _, value in dlq]
        assert sorted(topic_reasons) == sorted(bad)


def test_cart_abandonment_triggers_match_what_customers_did(outcome: Outcome) -> None:
    """Triggered customers really left items in the cart (from the raw truth), at most once."""
    import orjson

    from pipeline.runner import emit_triggers
    from pipeline.stream.trigger_scan import watermark

    run, sim = outcome.run, outcome.sim
    first = emit_triggers(run)
    assert emit_triggers(run) == []  # a second scan finds nothing new
    mark = watermark(run.warehouse)
    assert mark is not None
    params = run.settings.triggers
    last_add: dict[str, int] = {}
    last_order: dict[str, int] = {}
    for m in sim.messages:
        if m.kind != "valid" or m.true_customer_id.startswith("anon:"):
            continue
        name = orjson.loads(m.value).get("event")
        book = (
            last_add
            if name == "Product Added"
            else last_order
            if name == "Order Completed"
            else None
        )
        if book is not None:
            book[m.true_customer_id] = max(book.get(m.true_customer_id, 0), m.timestamp_ms)
    due_before = mark - int((params.cart_abandonment_minutes + params.grace_minutes) * 60_000)
    expired_before = due_before - int(params.max_age_hours * 3_600_000)  # (not emitted)
    candidates = {
        c
        for c, t in last_add.items()
        if t > last_order.get(c, 0) and expired_before <= t <= due_before
    }
    triggered = {t.customer_id for t in first if t.trigger == "cart_abandonment"}
    assert triggered <= candidates
    assert len(triggered) >= 0.7 * len(candidates)  # the rest emptied their carts by hand
    assert len({t.trigger_id for t in first}) == len(first)


def test_crm_sync_flows_through_kafka_into_profiles_and_forgotten_customers_are_dropped(
    settings: Settings,
) -> None:
    """CRM records reach the profile via crm.customers; a suppressed customer's events don't."""
    import hashlib
    import json

    from pipeline.gdpr import suppression_path
    from pipeline.sync import KafkaRecordProducer

    now = datetime.now(UTC)

    def event(i: int, user: str) -> RawMessage:
        return _viewed(user, f"crm-{user}-{i}", now)

    # cus_gone was forgotten before its events arrive (the suppression list holds hashes only)
    suppression_path(settings).parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(b"cus_gone").hexdigest()
    suppression_path(settings).write_text(json.dumps({"ids": [digest]}) + "\n")
    messages = [event(i, "cus_kept") for i in range(3)] + [event(i, "cus_gone") for i in range(3)]
    crm = {
        "customer_id": "cus_kept",
        "email": "  Kept@Example.COM ",
        "first_name": "Ada",
        "last_name": "Lovelace",
        "timezone": "Europe/London",
        "loyalty_tier": "gold",
        "email_consent": True,
        "updated_at": now.isoformat(),
        "source": "test",
    }
    with pipeline_run(settings) as run:

        def feed() -> None:
            produce_messages(settings, run.address, messages)
            producer = KafkaRecordProducer(settings, run.address)
            producer.send("cus_kept", crm)
            producer.flush()

        process_until_idle(run, expected_raw=len(messages), feed=feed, idle_s=2.0, timeout_s=120)
        traits = run.warehouse.get_profile("cus_kept")["traits"]
        assert traits["email"] == "kept@example.com"
        assert (traits["loyaltyTier"], traits["emailConsent"]) == ("gold", True)
        assert run.warehouse.get_profile("cus_kept")["event_count"] == 3
        assert run.metrics.suppressed == 3
        gone = run.warehouse.scalar("SELECT COUNT(*) FROM events WHERE customer_id = 'cus_gone'")
        assert gone == 0


def test_triggers_become_rendered_emails_delivered_once_at_their_send_time(
    outcome: Outcome,
) -> None:
    from pipeline.delivery.client import MemoryEmailPlatform
    from pipeline.runner import make_producer, trigger_delivery
    from pipeline.stream.trigger_scan import find_due

    run = outcome.run
    triggers = find_due(run.warehouse, run.settings.triggers)
    assert triggers
    platform = MemoryEmailPlatform()
    delivery = trigger_delivery(run, make_producer(run.settings, run.address), platform)
    now = [0]
    delivery.clock_ms = lambda: now[0]
    queued = delivery.schedule(triggers)
    assert queued + delivery.stats.skipped_no_consent == len(triggers)
    assert delivery.schedule(triggers) == 0  # the same as-of emails are not queued twice
    now[0] = int(datetime.now(UTC).timestamp() * 1000)
    early, _ = delivery.deliver()
    assert early < queued  # optimized send times lie ahead: not everything is due at once
    waiting = run.warehouse.scheduled_emails()
    assert len(waiting) == queued - early  # the rest waits in the warehouse too

    # a restart: a new delivery with an empty queue takes the schedule up from the warehouse
    restarted = trigger_delivery(run, make_producer(run.settings, run.address), platform)
    restarted.clock_ms = lambda: now[0]
    assert restarted.recover() == queued - early
    # a customer forgotten meanwhile loses their row (pipeline forget): not sent
    gone = waiting[0]
    run.warehouse.unschedule_emails([gone["email_id"]])
    # a customer who ordered meanwhile (the stream's next profile update) is not told they
    # left their cart: the trigger is no longer due when the email is
    bought = next(
        w for w in waiting[1:] if w["campaign_id"] == "cart_abandonment" and w is not gone
    )
    profile = run.warehouse.get_profile(bought["customer_id"])
    ordered = (profile["last_cart_ms"] or 0) + 1
    run.warehouse.write_profiles(
        [{**profile, "cart": {}, "last_order_ms": ordered, "version": profile["version"] + 1}]
    )
    for send_at in sorted({w["send_at_ms"] for w in waiting}):  # each in its hour
        now[0] = send_at
        restarted.deliver()
    assert restarted.stats.dropped_forgotten == 1
    assert restarted.stats.dropped_stale == 1
    assert platform.calls == len(platform.sent) == queued - 2  # each email sent exactly once
    assert gone["email_id"] not in platform.sent
    assert bought["email_id"] not in platform.sent
    assert run.warehouse.scheduled_emails() == []
    sent = run.warehouse.query("SELECT customer_id, campaign_id, html FROM sent_emails")
    assert len(sent) == queued - 2
    assert set(sent.campaign_id) <= {"cart_abandonment", "browse_abandonment"}
    assert all("unsubscribe" in html.lower() for html in sent.html)


def test_messages_keyed_by_another_identity_are_rekeyed_and_lose_nothing(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A producer that keys by userId (or not at all) gets the same results as a device-keyed one.

    Stage 1 keeps per-device state under the message key, so a message keyed otherwise goes
    round the raw topic once more under its device key; nothing is lost or counted twice.
    """
    import json

    home = tmp_path_factory.mktemp("rekey") / "home"
    settings = Settings(home=home, partitions=4, commit_interval_s=0.3)
    with pipeline_run(settings) as run:
        sim = simulate(SimulationConfig(events=2000, seed=5, end=END, days=5), run.catalog)
        rekeyed = 0
        messages: list[RawMessage] = []
        for i, m in enumerate(sim.messages):
            key = m.key
            if m.kind != "malformed":
                body = json.loads(m.value)
                # the usual mistake: userId first; and every 7th message with no key at all
                key = None if i % 7 == 0 else (body.get("userId") or "").encode() or m.key
                rekeyed += key != m.key
            messages.append(dataclasses.replace(m, key=key))
        assert rekeyed > 500
        process_until_idle(
            run,
            expected_raw=len(messages),
            feed=lambda: produce_messages(settings, run.address, messages) and None,
            timeout_s=300,
        )
        assert run.metrics.rekeyed == rekeyed
        wh, truth = run.warehouse, sim.ground_truth
        per_customer = wh.query(
            "SELECT customer_id, COUNT(*) AS n FROM events GROUP BY customer_id"
        )
        measured = dict(
            zip(per_customer["customer_id"], per_customer["n"].astype(int), strict=True)
        )
        assert measured == truth.expected_event_counts
        links = wh.query("SELECT anonymous_id, customer_id FROM identity_links")
        assert dict(zip(links["anonymous_id"], links["customer_id"], strict=True)) == (
            truth.identity_links
        )
        assert run.metrics.duplicates_dropped == sum(m.kind == "duplicate" for m in messages)


def test_bad_crm_and_internal_records_are_dead_lettered_and_processing_goes_on(
    settings: Settings,
) -> None:
    """A CRM record without a customer_id or a readable updated_at (or not JSON at all), and a
    record on stage 2's input that no stage 1 wrote, each stopped the processor before."""

    from pipeline.runner import make_producer
    from pipeline.sync import KafkaRecordProducer

    now = datetime.now(UTC)
    # a folder of the tz database, not a zone
    messages = [_viewed("cus_ok", f"ok-{i}", now, timezone="Europe") for i in range(3)]
    bad_crm = [
        (b"cus_ok", b"null"),
        (b"cus_ok", b"{not json"),
        (b"cus_ok", orjson.dumps({"email": "a@b.c", "updated_at": now.isoformat()})),
        (b"cus_ok", orjson.dumps({"customer_id": "cus_ok", "updated_at": "yesterday"})),
    ]
    foreign = orjson.dumps({"kind": "event", "customer_id": "cus_ok", "seq": [9, 9, 0]})
    crm = {"customer_id": "cus_ok", "first_name": "Ada", "updated_at": now.isoformat()}
    with pipeline_run(settings) as run:

        def feed() -> None:
            produce_messages(settings, run.address, messages)
            producer = make_producer(settings, run.address)
            for key, value in bad_crm:
                producer.produce(settings.topics.crm_customers, key=key, value=value)
            producer.produce(settings.topics.attributed, key=b"cus_ok", value=foreign)
            assert producer.flush(10) == 0
            good = KafkaRecordProducer(settings, run.address)
            good.send("cus_ok", crm)
            good.flush()

        process_until_idle(run, expected_raw=len(messages), feed=feed, idle_s=2.0, timeout_s=120)
        letters = run.warehouse.query("SELECT reason, detail, message_key FROM dead_letters")
        assert sorted(letters["reason"]) == ["bad_crm_record"] * 4 + ["processing_failed"]
        failed = letters[letters["reason"] == "processing_failed"].iloc[0]
        assert "stage 2 failed" in failed["detail"] and failed["message_key"] == "cus_ok"
        profile = run.warehouse.get_profile("cus_ok")
        assert profile["event_count"] == 3  # the events in an unknown zone: counted, as UTC
        assert profile["traits"]["firstName"] == "Ada"  # the good CRM record after the bad ones
        dlq = read_topic(settings, run.address, "events.dlq")
        assert sorted(orjson.loads(v)["reason"] for _, v in dlq) == sorted(letters["reason"])


def test_the_scans_clock_puts_a_customer_not_seen_for_a_month_into_lapsed(
    settings: Settings,
) -> None:
    """Time-dependent segments change without events: the trigger scan ticks stage 2 at the
    stream's watermark, and the change lands in segment_changes like any other."""
    from datetime import timedelta

    from pipeline.runner import make_producer, segment_clock

    now = datetime.now(UTC).replace(microsecond=0)

    messages = [
        _viewed("cus_gone_quiet", "clock-1", now - timedelta(days=40)),
        _viewed("cus_active", "clock-2", now),
    ]
    ticked: list[int] = []
    with pipeline_run(settings) as run:

        def feed() -> None:
            produce_messages(settings, run.address, messages)
            deadline = time.monotonic() + 60
            while run.warehouse.counts()["profiles"] < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            clock = segment_clock(run, make_producer(settings, run.address))
            ticked.append(clock.tick())
            ticked.append(clock.tick())  # the watermark has not moved: nothing more

        process_until_idle(run, expected_raw=len(messages), feed=feed, idle_s=2.0, timeout_s=120)
        assert ticked == [1, 0]
        changes = run.warehouse.query(
            "SELECT customer_id, segment, change, at_ms FROM segment_changes WHERE segment = ?",
            ("lapsed",),
        )
        mark = int(now.timestamp() * 1000)
        assert changes.to_dict("records") == [
            {"customer_id": "cus_gone_quiet", "segment": "lapsed", "change": "enter", "at_ms": mark}
        ]
        assert run.warehouse.get_profile("cus_gone_quiet")["segments"] == ["lapsed"]
