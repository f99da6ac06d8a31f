"""The storefront in system Chromium: real analytics.js, real collector, real broker, real topic.

Playwright drives the page served by the collector; the events the vendored
``@segment/analytics-next`` bundle batches to ``/v1/b`` are read back from the raw topic
and must all parse into clean events.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from browser import CHROMIUM, CHROMIUM_ARGS
from collector_helpers import KEYS, collector_settings, read_raw, running_collector

from pipeline.broker import EmbeddedBroker, ensure_topics
from pipeline.events import CleanEvent
from pipeline.parsing import ParseLimits, parse_event
from pipeline.schemas import default_registry
from pipeline.settings import Settings

CUSTOMER = "cus_000001"
EXPECTED_TRACKS = {
    "Product Clicked",
    "Product Viewed",
    "Product Added",
    "Scroll Depth",
    "Video Played",
    "Logged In",
}

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"no system Chromium at {CHROMIUM} (apt-get install -y chromium)",
    ),
    pytest.mark.timeout(180),
]


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[tuple[Settings, str, str]]:
    broker = EmbeddedBroker.start()
    try:
        settings = collector_settings(tmp_path / "home")
        ensure_topics(settings, broker.address)
        with running_collector(settings, broker.address) as url:
            yield settings, broker.address, url
    finally:
        broker.stop()


def _name(event: dict[str, Any]) -> str:
    return str(event["event"]) if event["type"] == "track" else str(event["type"])


class Traffic:
    """What the page sent: every request URL, and the events of each ``/v1/b`` batch."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.batches: list[list[dict[str, Any]]] = []
        self.statuses: list[int] = []
        self.console_errors: list[str] = []

    def on_request(self, request: Any) -> None:
        self.urls.append(request.url)
        if urlsplit(request.url).path == "/v1/b":
            self.batches.append(orjson.loads(request.post_data)["batch"])

    def on_response(self, response: Any) -> None:
        if urlsplit(response.url).path.startswith("/v1/"):
            self.statuses.append(response.status)

    def on_console(self, message: Any) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def events(self) -> list[dict[str, Any]]:
        return [event for batch in self.batches for event in batch]

    def names(self) -> Counter[str]:
        return Counter(_name(e) for e in self.events())


def _drive(page: Any, url: str, traffic: Traffic, screenshot: Path) -> str:
    """Shop like a customer; returns the page's anonymousId once every event was acknowledged."""
    page.goto(f"{url}/storefront")
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_selector(".card")
    height = page.evaluate("document.documentElement.scrollHeight")
    for fraction in (0.3, 0.55, 0.8, 1.0):
        page.evaluate(f"window.scrollTo(0, {int(height * fraction)})")
        page.wait_for_timeout(80)
    page.evaluate("window.scrollTo(0, 0)")
    cards = page.locator(".card")
    for index in (0, 1, 4):
        cards.nth(index).locator("h3").click()
    page.locator("#detail button.add").click()
    cards.nth(2).locator("button.add").click()
    page.locator("#detail button.play").click()
    page.wait_for_function("() => !document.querySelector('#detail video').paused")
    page.fill("input[name=password]", "demo")
    page.click("#login button[type=submit]")
    page.wait_for_selector("text=Signed in as cus_000001")

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        names = traffic.names()
        if (
            names.keys() >= EXPECTED_TRACKS
            and names["identify"] == 1
            and names["Scroll Depth"] >= 4
            and len(traffic.statuses) == len(traffic.batches)
        ):
            break
        page.wait_for_timeout(100)
    page.screenshot(path=str(screenshot), full_page=False)
    anonymous_id: str = page.evaluate(
        "async () => (await window.storefront.analytics.user()).anonymousId()"
    )
    return anonymous_id


def test_storefront_events_arrive_batched_and_clean(
    collector: tuple[Settings, str, str], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    settings, address, url = collector
    traffic = Traffic()
    screenshot = tmp_path / "storefront.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("request", traffic.on_request)
            page.on("response", traffic.on_response)
            page.on("console", traffic.on_console)
            anonymous_id = _drive(page, url, traffic, screenshot)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 0

    foreign = {u for u in traffic.urls if urlsplit(u).scheme in ("http", "https", "ws", "wss")}
    assert {urlsplit(u).hostname for u in foreign} == {"127.0.0.1"}, traffic.urls
    assert not [u for u in traffic.urls if urlsplit(u).path in ("/v1/t", "/v1/p", "/v1/i")]
    assert not traffic.console_errors

    names = traffic.names()
    assert names.keys() >= EXPECTED_TRACKS, names
    assert names["page"] >= 1 and names["identify"] == 1
    assert names["Product Clicked"] == 3 and names["Product Viewed"] == 3
    assert names["Product Added"] == 2 and names["Video Played"] == 1
    assert traffic.statuses and set(traffic.statuses) == {200}
    sizes = [len(batch) for batch in traffic.batches]
    assert max(sizes) >= 3, f"events were not batched: {sizes}"
    assert max(sizes) <= 50 and len(traffic.batches) < len(traffic.events()), sizes

    sent = traffic.events()
    ids = {e["messageId"] for e in sent}
    assert len(ids) == len(sent)
    found = read_raw(settings, address, ids)
    assert found.keys() == ids

    registry = default_registry()
    limits = ParseLimits()
    now_ms = int(time.time() * 1000)
    session_ids: set[str] = set()
    depths: set[int] = set()
    for message_id, (key, raw) in found.items():
        assert raw["anonymousId"] == anonymous_id
        assert key == anonymous_id.encode()  # keyed by the device, before and after login
        assert raw["context"]["device"]["type"] == "desktop"
        assert raw["context"]["sourceId"] == "storefront"
        assert raw["context"]["library"]["name"] == "analytics.js"
        assert "writeKey" not in raw and KEYS["storefront"] not in orjson.dumps(raw).decode()
        session_ids.add(raw["context"]["sessionId"])
        if raw.get("userId"):
            assert raw["userId"] == CUSTOMER
        if raw["type"] == "track" and raw["event"] == "Scroll Depth":
            depths.add(raw["properties"]["depth"])
        clean = parse_event(
            orjson.dumps(raw),
            registry=registry,
            limits=limits,
            now_ms=now_ms,
            ingested_ms=now_ms,
            key=key.decode() if key else None,
        )
        assert isinstance(clean, CleanEvent), (message_id, clean)
        assert clean.session_id == raw["context"]["sessionId"]
        assert clean.device_type == "desktop"
    assert len(session_ids) == 1 and next(iter(session_ids)).startswith("s_")
    assert depths == {25, 50, 75, 100}
    logged_in = [raw for _, raw in found.values() if raw.get("event") == "Logged In"]
    assert [raw["userId"] for raw in logged_in] == [CUSTOMER]
    clicked = [raw for _, raw in found.values() if raw.get("event") == "Product Clicked"]
    assert sorted(raw["properties"]["position"] for raw in clicked) == [1, 2, 5]
    for raw in clicked:
        assert {"product_id", "category", "brand", "price", "position"} <= raw["properties"].keys()

    # and on to the customer's profile: the real processor stitches the browsing history
    # done before the login into cus_000001
    from pipeline.runner import pipeline_run, process_until_idle

    proc_settings = settings.model_copy(
        update={"broker": address, "home": tmp_path / "processor", "commit_interval_s": 0.3}
    )
    with pipeline_run(proc_settings) as run:
        process_until_idle(run, expected_raw=len(found), idle_s=2.0, timeout_s=120)
        profile = run.warehouse.get_profile(CUSTOMER)
        assert profile["event_count"] == len(found)
        assert anonymous_id in profile["anonymous_ids"]
        assert profile["counts"]["Product Added"] == 2
        assert profile["cart"]
        assert profile["category_affinity"]
