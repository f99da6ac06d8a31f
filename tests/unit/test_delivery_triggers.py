"""Trigger emails from scan to send time, on a real SQLite warehouse and the real renderer: which
email goes out, to which address, and that nothing is lost when a step fails on the way (only
the email platform and the broker's producer are stand-ins)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, cast

import httpx
import orjson
import pytest

from pipeline.api.service import PersonalizationService
from pipeline.delivery.client import DeliveryClient, EmailPlatform, MemoryEmailPlatform
from pipeline.delivery.config import DeliverySettings
from pipeline.delivery.payload import idempotency_key
from pipeline.errors import BrokerError, StoreError
from pipeline.runner import Run, scan_step
from pipeline.scoring import new_profile, profile_to_dict
from pipeline.settings import Settings
from pipeline.stores.local import LocalWarehouse
from pipeline.stream.trigger_delivery import (
    PAUSE_MS,
    RENDER_TRIES,
    TriggeredDelivery,
)
from pipeline.stream.trigger_scan import ARRIVAL_ALLOWANCE_MS, emit_due, find_due, watermark
from pipeline.testing import T0_MS, make_event
from pipeline.triggers import MINUTE_MS, Trigger

HOUR = 60 * MINUTE_MS
DAY = 24 * HOUR


class Producer:
    """The broker's producer as the scan and the dead letters use it; ``acknowledging=False``
    plays a broker that does not answer (flush leaves every record undelivered)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.acknowledging = True

    def produce(self, topic: str, key: bytes, value: bytes, **_: object) -> None:
        self.sent.append((topic, orjson.loads(value)))

    def flush(self, timeout: float) -> int:
        return 0 if self.acknowledging else len(self.sent)


class Shop:
    """A warehouse, the renderer on it, and a trigger delivery, all on one clock ``now``."""

    def __init__(self, settings: Settings, platform: EmailPlatform | None = None) -> None:
        self.settings = settings
        self.now = T0_MS
        self.on_render: Callable[[], None] = lambda: None
        self.warehouse = LocalWarehouse(settings.warehouse_path)
        self.service = PersonalizationService(
            settings, clock_ms=self._render_clock, background_refresh=False
        )
        self.producer = Producer()
        self.platform = platform or MemoryEmailPlatform()
        self.delivery = self.new_delivery()

    def _render_clock(self) -> int:
        self.on_render()  # the renderer reads the clock once per email, after the profile
        return self.now

    def new_delivery(self) -> TriggeredDelivery:
        """A delivery as a (re)started process builds it: an empty queue."""
        return TriggeredDelivery(
            service=self.service,
            platform=self.platform,
            warehouse=self.warehouse,
            producer=self.producer,  # type: ignore[arg-type]
            dlq_topic="email.dlq",
            clock_ms=lambda: self.now,
        )

    def carted(self, customer: str, at_ms: int, *, version: int = 1, **traits: Any) -> None:
        """``customer`` last added to the cart at ``at_ms`` (their profile, ``version``)."""
        p = new_profile(customer, is_anonymous=False)
        p.last_cart_ms, p.cart, p.version = at_ms, {"P1": version}, version
        p.traits = {"email": f"{customer}@example.com", **traits}
        self.warehouse.write_profiles([profile_to_dict(p)])

    def event(self, at_ms: int, *, arrived_ms: int | None = None) -> None:
        """An event of someone else, moving the stream's clock."""
        arrived = at_ms if arrived_ms is None else arrived_ms
        event = make_event(ts=at_ms, ingested_ms=arrived, customer_id="other", user_id="other")
        self.warehouse.write_events([event.to_dict()])

    def sql(self, statement: str) -> None:
        """Run ``statement`` on a connection of its own (another process on the same file)."""
        with sqlite3.connect(self.settings.warehouse_path) as conn:
            conn.execute(statement)
        conn.close()

    def fail_inserts(self, table: str) -> None:
        """Make every insert into ``table`` fail (as on a full disk) until :meth:`heal`."""
        self.sql(
            f"CREATE TRIGGER fail_{table} BEFORE INSERT ON {table}"
            " BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )

    def heal(self, table: str) -> None:
        self.sql(f"DROP TRIGGER fail_{table}")

    def scan(self) -> Callable[[], None]:
        run = cast(Run, SimpleNamespace(settings=self.settings, warehouse=self.warehouse))
        return scan_step(run, self.producer, self.delivery)  # type: ignore[arg-type]

    def last_send_at(self) -> int:
        """The latest send time scheduled (in its hour, every email scheduled is due)."""
        return max(row["send_at_ms"] for row in self.warehouse.scheduled_emails())

    def recorded(self) -> list[str]:
        return list(self.warehouse.query("SELECT trigger_id FROM email_triggers")["trigger_id"])

    def scheduled(self) -> int:
        return int(self.warehouse.scalar("SELECT COUNT(*) FROM scheduled_emails"))

    def close(self) -> None:
        self.service.close()
        self.warehouse.close()


@pytest.fixture
def shop(settings: Settings) -> Iterator[Shop]:
    s = Shop(settings)
    yield s
    s.close()


def _key(trigger: Trigger) -> str:
    return idempotency_key(trigger.trigger, trigger.customer_id, trigger.trigger_id)


def _rejecting_platform() -> DeliveryClient:
    """A platform that refuses every email for good (422)."""

    return _platform(lambda _request: httpx.Response(422, json={"error": "invalid recipient"}))


def _platform(answer: Callable[[httpx.Request], httpx.Response]) -> DeliveryClient:
    """A real delivery client whose platform ``answer``s each send (tokens always granted)."""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth/token":
            return httpx.Response(200, json={"access_token": "t", "expires_in": 600})
        return answer(request)

    config = DeliverySettings(
        send_url="https://esp.test/v1/send",
        token_url="https://esp.test/oauth/token",
        client_id="id",
        client_secret="secret",
    )
    http = httpx.Client(transport=httpx.MockTransport(handle))
    return DeliveryClient(config, http=http, sleep=lambda _s: None)


def test_a_cart_added_to_again_before_the_send_time_gets_one_email_the_newest(
    shop: Shop,
) -> None:
    shop.carted("c1", T0_MS)
    shop.event(T0_MS + 2 * HOUR)
    shop.now = T0_MS + 2 * HOUR
    [first] = find_due(shop.warehouse, shop.delivery.trigger_params)
    assert shop.delivery.schedule([first]) == 1
    # the customer comes back before that email's send time, adds an item and leaves again
    shop.carted("c1", T0_MS + 3 * HOUR, version=2)
    shop.event(T0_MS + 5 * HOUR)
    shop.now = T0_MS + 5 * HOUR
    [second] = find_due(shop.warehouse, shop.delivery.trigger_params)
    assert second.trigger_id != first.trigger_id
    assert shop.delivery.schedule([second]) == 1

    shop.now = shop.last_send_at()  # both send times have come
    assert shop.delivery.deliver() == (1, 0)
    assert isinstance(shop.platform, MemoryEmailPlatform)
    assert list(shop.platform.sent) == [_key(second)]
    assert shop.delivery.stats.dropped_stale == 1
    assert shop.scheduled() == 0


def test_consent_and_address_are_read_again_at_the_send_time(shop: Shop) -> None:
    shop.carted("c1", T0_MS)
    shop.carted("c2", T0_MS)
    shop.event(T0_MS + 2 * HOUR)
    triggers = {t.customer_id: t for t in find_due(shop.warehouse, shop.delivery.trigger_params)}
    assert shop.delivery.schedule(list(triggers.values())) == 2
    # before the send time (the cart still armed): c1 unsubscribes, c2 changes address
    shop.carted("c1", T0_MS, version=2, emailConsent=False)
    shop.carted("c2", T0_MS, version=2, email="new-c2@example.com")

    shop.now = shop.last_send_at()
    assert shop.delivery.deliver() == (1, 0)
    assert isinstance(shop.platform, MemoryEmailPlatform)
    assert list(shop.platform.sent) == [_key(triggers["c2"])]
    assert shop.platform.sent[_key(triggers["c2"])].to == "new-c2@example.com"
    stored = shop.warehouse.query("SELECT customer_id, email_sha256 FROM sent_emails")
    assert list(stored.customer_id) == ["c2"]
    assert shop.delivery.stats.skipped_no_consent == 1
    assert shop.scheduled() == 0  # c1's email is off the schedule too, not sent after a restart


def test_a_customer_forgotten_while_a_batch_is_rendered_drops_only_their_email(
    shop: Shop,
) -> None:
    shop.carted("c1", T0_MS)
    shop.carted("c2", T0_MS)
    shop.event(T0_MS + 2 * HOUR)
    triggers = sorted(
        find_due(shop.warehouse, shop.delivery.trigger_params), key=lambda t: t.customer_id
    )
    forget = ["c1"]

    def forget_during_render() -> None:  # `pipeline forget c1` runs while c1's email renders
        if forget:
            shop.sql(f"DELETE FROM profiles WHERE customer_id = '{forget.pop()}'")

    shop.on_render = forget_during_render
    assert shop.delivery.schedule(triggers) == 1
    assert shop.recorded() == [triggers[1].trigger_id]  # nothing kept of c1
    assert shop.warehouse.scheduled_emails()[0]["customer_id"] == "c2"


def test_a_trigger_whose_email_failed_to_render_is_emitted_again_by_the_next_scan(
    shop: Shop,
) -> None:
    shop.carted("c1", T0_MS)
    shop.event(T0_MS + 2 * HOUR)
    failures = [StoreError("query failed: database is locked")]

    def render_fails_once() -> None:
        if failures:
            raise failures.pop()

    shop.on_render = render_fails_once
    scan = shop.scan()
    scan()
    assert shop.recorded() == [] and shop.scheduled() == 0
    scan()
    [trigger] = find_due(shop.warehouse, shop.delivery.trigger_params)
    assert shop.recorded() == [trigger.trigger_id] and shop.scheduled() == 1
    assert [record["trigger_id"] for _, record in shop.producer.sent] == [trigger.trigger_id] * 2


def test_a_trigger_whose_email_never_renders_is_given_up_after_some_scans(shop: Shop) -> None:
    shop.carted("c1", T0_MS)
    shop.event(T0_MS + 2 * HOUR)

    def render_fails() -> None:
        raise StoreError("query failed: database is locked")

    shop.on_render = render_fails
    scan = shop.scan()
    for _ in range(RENDER_TRIES - 1):
        scan()
    assert shop.recorded() == []  # still tried again
    scan()
    [trigger] = find_due(shop.warehouse, shop.delivery.trigger_params)
    assert shop.recorded() == [trigger.trigger_id] and shop.scheduled() == 0
    scan()  # recorded: not emitted again
    assert [r["trigger_id"] for _, r in shop.producer.sent] == [trigger.trigger_id] * RENDER_TRIES


def test_a_trigger_is_recorded_with_its_scheduled_email_or_not_at_all(shop: Shop) -> None:
    shop.carted("c1", T0_MS)
    shop.event(T0_MS + 2 * HOUR)
    shop.fail_inserts("scheduled_emails")
    scan = shop.scan()
    scan()
    assert shop.recorded() == [] and shop.scheduled() == 0 and len(shop.delivery.scheduler) == 0
    shop.heal("scheduled_emails")
    scan()
    assert len(shop.recorded()) == 1 and shop.scheduled() == 1
    assert len(shop.delivery.scheduler) == 1


def test_a_failure_to_record_sent_emails_queues_them_again(shop: Shop) -> None:
    shop.carted("c1", T0_MS)
    shop.event(T0_MS + 2 * HOUR)
    shop.delivery.schedule(find_due(shop.warehouse, shop.delivery.trigger_params))
    shop.fail_inserts("sent_emails")
    shop.now = shop.last_send_at()
    with pytest.raises(StoreError):
        shop.delivery.deliver()
    assert len(shop.delivery.scheduler) == 1 and shop.scheduled() == 1
    shop.heal("sent_emails")
    assert shop.delivery.deliver() == (1, 0)
    assert shop.warehouse.scalar("SELECT COUNT(*) FROM sent_emails") == 1
    assert shop.scheduled() == 0


def test_permanent_failures_leave_the_schedule_only_once_all_are_dead_lettered(
    settings: Settings,
) -> None:
    shop = Shop(settings, platform=_rejecting_platform())
    try:
        for customer in ("c1", "c2", "c3"):
            shop.carted(customer, T0_MS)
        shop.event(T0_MS + 2 * HOUR)
        assert shop.delivery.schedule(find_due(shop.warehouse, shop.delivery.trigger_params)) == 3
        shop.now = shop.last_send_at()
        shop.producer.acknowledging = False
        with pytest.raises(BrokerError):
            shop.delivery.deliver()
        assert len(shop.producer.sent) == 3  # every one produced before the one flush
        assert shop.scheduled() == 3 and len(shop.delivery.scheduler) == 3  # retried later
        assert shop.delivery.stats.failed == 0

        shop.producer.acknowledging = True
        assert shop.delivery.deliver() == (0, 3)
        assert shop.scheduled() == 0 and len(shop.delivery.scheduler) == 0
        assert {r["customer"] for _, r in shop.producer.sent[3:]} == {"c1", "c2", "c3"}
        assert {topic for topic, _ in shop.producer.sent} == {"email.dlq"}
    finally:
        shop.close()


class FlakyPlatform:
    """The platform's HTTP API behind a real client, answering 503 while ``down``."""

    def __init__(self) -> None:
        self.down = True
        self.sends: list[str] = []  # idempotency keys, one per request

        def answer(request: httpx.Request) -> httpx.Response:
            self.sends.append(request.headers["Idempotency-Key"])
            return httpx.Response(503 if self.down else 202, json={"id": "m"})

        self.client = _platform(answer)


def test_an_outage_pauses_sending_and_loses_no_email(settings: Settings) -> None:
    flaky = FlakyPlatform()
    shop = Shop(settings, platform=flaky.client)
    try:
        for customer in ("c1", "c2", "c3"):
            shop.carted(customer, T0_MS)
        shop.event(T0_MS + 2 * HOUR)
        assert shop.delivery.schedule(find_due(shop.warehouse, shop.delivery.trigger_params)) == 3
        shop.now = shop.last_send_at()
        assert shop.delivery.deliver() == (0, 0)
        tries = len(flaky.sends)
        assert len(set(flaky.sends)) == 1  # one email's retries, not every email's
        assert shop.scheduled() == 3 and len(shop.delivery.scheduler) == 3
        assert shop.producer.sent == [] and shop.delivery.stats.deferred == 1
        assert shop.delivery.deliver() == (0, 0) and len(flaky.sends) == tries  # paused
        shop.now += PAUSE_MS
        assert shop.delivery.deliver() == (0, 0) and len(flaky.sends) == 2 * tries
        shop.now += PAUSE_MS  # the second failure in a row pauses twice as long
        assert shop.delivery.deliver() == (0, 0) and len(flaky.sends) == 2 * tries
        flaky.down = False
        shop.now += PAUSE_MS
        assert shop.delivery.deliver() == (3, 0)
        assert shop.scheduled() == 0 and shop.producer.sent == []
    finally:
        shop.close()


def test_an_outage_past_the_send_hour_moves_the_email_to_that_hour_of_the_next_day(
    settings: Settings,
) -> None:
    flaky = FlakyPlatform()
    shop = Shop(settings, platform=flaky.client)
    try:
        shop.carted("c1", T0_MS, timezone="America/New_York")
        shop.event(T0_MS + 2 * HOUR)
        shop.delivery.schedule(find_due(shop.warehouse, shop.delivery.trigger_params))
        send_at = shop.delivery.scheduler.next_due_ms()
        assert send_at is not None
        shop.now = send_at + 10 * MINUTE_MS
        assert shop.delivery.deliver() == (0, 0) and shop.delivery.stats.deferred == 1
        shop.now = send_at + 2 * HOUR  # the outage outlasts the customer's best hour
        assert shop.delivery.deliver() == (0, 0)
        assert shop.delivery.stats.replanned == 1 and shop.producer.sent == []
        [row] = shop.warehouse.scheduled_emails()
        assert row["send_at_ms"] == shop.delivery.scheduler.next_due_ms() == send_at + DAY
        flaky.down = False
        shop.now = send_at + DAY
        assert shop.delivery.deliver() == (1, 0)
    finally:
        shop.close()


def test_the_scan_queues_again_what_a_previous_run_scheduled(shop: Shop) -> None:
    shop.carted("c1", T0_MS)
    shop.event(T0_MS + 2 * HOUR)
    shop.delivery.schedule(find_due(shop.warehouse, shop.delivery.trigger_params))
    shop.delivery = shop.new_delivery()  # a restart (`up`, or `up --replicas`)
    shop.scan()
    assert len(shop.delivery.scheduler) == 1 and shop.delivery.stats.recovered == 1


def test_emails_due_are_sent_even_when_the_broker_does_not_acknowledge(shop: Shop) -> None:
    shop.carted("c1", T0_MS)
    shop.event(T0_MS + 2 * HOUR)
    [trigger] = find_due(shop.warehouse, shop.delivery.trigger_params)
    shop.delivery.schedule([trigger])
    shop.carted("c2", T0_MS)  # a new trigger, which the scan cannot produce
    shop.producer.acknowledging = False
    shop.now = shop.last_send_at()
    shop.scan()()
    assert isinstance(shop.platform, MemoryEmailPlatform)
    assert list(shop.platform.sent) == [_key(trigger)]
    assert shop.recorded() == [trigger.trigger_id]  # c2's stays unrecorded: emitted again


def test_a_device_clock_far_ahead_does_not_move_the_watermark_past_the_arrivals(
    shop: Shop,
) -> None:
    shop.carted("shopper", T0_MS - MINUTE_MS)  # still shopping
    shop.event(T0_MS)
    assert watermark(shop.warehouse) == T0_MS
    shop.event(T0_MS + 23 * HOUR, arrived_ms=T0_MS + 1_000)  # a device 23 h fast
    assert watermark(shop.warehouse) == T0_MS + 1_000 + ARRIVAL_ALLOWANCE_MS
    assert emit_due(shop.warehouse, shop.producer, "t", shop.delivery.trigger_params) == []
    shop.event(T0_MS + 2 * HOUR)  # time goes on: the cart is abandoned after all
    assert [t.customer_id for t in find_due(shop.warehouse, shop.delivery.trigger_params)] == [
        "shopper"
    ]


def test_a_cart_abandoned_longer_ago_than_the_max_age_is_not_emailed(shop: Shop) -> None:
    max_age = int(shop.delivery.trigger_params.max_age_hours * HOUR)
    shop.carted("old", T0_MS)  # (triggers switched on over a store with old carts)
    shop.carted("recent", T0_MS + max_age)
    shop.event(T0_MS + max_age + 2 * HOUR)
    scan = shop.scan()
    scan()
    assert [r["customer_id"] for _, r in shop.producer.sent] == ["recent"]
    assert [row["customer_id"] for row in shop.warehouse.scheduled_emails()] == ["recent"]


def test_a_send_hour_missed_while_the_process_was_down_is_kept_for_the_next_day(
    shop: Shop,
) -> None:
    shop.carted("c1", T0_MS, timezone="Europe/Paris")
    shop.event(T0_MS + 2 * HOUR)
    shop.delivery.schedule(find_due(shop.warehouse, shop.delivery.trigger_params))
    send_at = shop.last_send_at()
    shop.delivery = shop.new_delivery()  # it comes back up 9 h later, at night in Paris
    shop.now = send_at + 9 * HOUR
    shop.event(shop.now)
    shop.scan()
    assert shop.delivery.deliver() == (0, 0) and shop.delivery.stats.replanned == 1
    assert shop.last_send_at() == send_at + DAY
    shop.now = send_at + DAY
    assert shop.delivery.deliver() == (1, 0)


def test_a_missed_send_hour_drops_an_email_whose_trigger_has_expired(shop: Shop) -> None:
    max_age = int(shop.delivery.trigger_params.max_age_hours * HOUR)
    shop.carted("c1", T0_MS)
    shop.event(T0_MS + 2 * HOUR)
    shop.delivery.schedule(find_due(shop.warehouse, shop.delivery.trigger_params))
    shop.delivery = shop.new_delivery()  # down for longer than a trigger lives
    shop.now = T0_MS + max_age + 3 * HOUR
    shop.event(shop.now)
    shop.scan()
    assert shop.delivery.deliver() == (0, 0)
    assert shop.delivery.stats.dropped_expired == 1 and shop.scheduled() == 0
    assert isinstance(shop.platform, MemoryEmailPlatform) and not shop.platform.sent


def test_a_failed_read_at_start_up_loses_no_scheduled_email_and_is_tried_again(
    shop: Shop,
) -> None:
    shop.carted("c1", T0_MS)
    shop.event(T0_MS + 2 * HOUR)
    shop.delivery.schedule(find_due(shop.warehouse, shop.delivery.trigger_params))
    shop.delivery = shop.new_delivery()  # a restart while the profiles cannot be read
    shop.sql("ALTER TABLE profiles RENAME TO profiles_away")
    scan = shop.scan()
    assert len(shop.delivery.scheduler) == 0 and shop.scheduled() == 1  # kept
    shop.sql("ALTER TABLE profiles_away RENAME TO profiles")
    scan()
    assert len(shop.delivery.scheduler) == 1 and shop.delivery.stats.recovered == 1
