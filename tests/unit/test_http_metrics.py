"""``GET /metrics`` of the collector and the API: counters move with real requests."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from starlette.testclient import TestClient

from pipeline.api.app import create_app as create_api
from pipeline.api.config import ApiSettings
from pipeline.collector.app import create_app as create_collector
from pipeline.collector.config import CollectorSettings
from pipeline.collector.intake import KeyedMessage
from pipeline.collector.publish import MemoryPublisher
from pipeline.gdpr import suppression_path
from pipeline.pii import sha256_hex
from pipeline.settings import Settings

WRITE_KEY = "wk_metrics"
API_KEY = "ak_metrics_0123456789"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(http: TestClient) -> Samples:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def collector_settings(home: Path) -> Settings:
    keys = {"web": SecretStr(WRITE_KEY)}
    return Settings(_env_file=None, home=home, collector=CollectorSettings(write_keys=keys))


def event(message_id: str, user_id: str = "u1") -> dict[str, object]:
    return {"type": "track", "event": "Product Viewed", "messageId": message_id, "userId": user_id}


class SlowPublisher(MemoryPublisher):
    """Acknowledges after 30 ms, like a broker one round trip away."""

    async def send(self, topic: str, messages: Sequence[KeyedMessage]) -> None:
        await asyncio.sleep(0.03)
        await super().send(topic, messages)


def test_collector_counts_accepted_produced_and_ack_latency(tmp_path: Path) -> None:
    settings = collector_settings(tmp_path)
    suppression_path(settings).parent.mkdir(parents=True, exist_ok=True)
    suppression_path(settings).write_text(orjson.dumps({"ids": [sha256_hex("u_gone")]}).decode())
    publisher = SlowPublisher()
    with TestClient(create_collector(settings, lambda: publisher)) as http:
        before = scrape(http)
        batch = [event("m1"), event("m2", "u_gone"), event("m3")]
        assert (
            http.post("/v1/batch", json={"batch": batch}, auth=(WRITE_KEY, "")).status_code == 200
        )
        assert http.post("/v1/track", json=event("m4"), auth=(WRITE_KEY, "")).status_code == 200
        after = scrape(http)
    assert before[("pipeline_collector_events_accepted_total", ())] == 0
    assert after[("pipeline_collector_events_accepted_total", ())] == 4
    # the forgotten customer's event is acknowledged, never produced
    assert after[("pipeline_collector_events_produced_total", ())] == 3
    assert len(publisher.sent) == 3
    ack = "pipeline_collector_produce_ack_seconds"
    assert after[(f"{ack}_count", ())] == 2
    assert after[(f"{ack}_bucket", (("le", "0.025"),))] == 0
    assert after[(f"{ack}_bucket", (("le", "0.1"),))] == 2
    assert after[(f"{ack}_sum", ())] >= 0.06


def test_collector_counts_refusals_by_status_and_code(tmp_path: Path) -> None:
    publisher = MemoryPublisher()
    rejected = "pipeline_collector_requests_rejected_total"
    with TestClient(create_collector(collector_settings(tmp_path), lambda: publisher)) as http:
        assert http.post("/v1/track", json=event("m1")).status_code == 401
        assert http.post("/v1/track", json=event("m2"), auth=("wk_wrong", "")).status_code == 401
        assert http.post("/v1/track", json=event("m3"), auth=("wk_wrong", "")).status_code == 401
        mid = scrape(http)
        publisher.available = False
        assert http.post("/v1/track", json=event("m4"), auth=(WRITE_KEY, "")).status_code == 503
        after = scrape(http)
    assert mid[(rejected, (("code", "missing_write_key"), ("status", "401")))] == 1
    assert mid[(rejected, (("code", "invalid_write_key"), ("status", "401")))] == 2
    assert (rejected, (("code", "delivery_timeout"), ("status", "503"))) not in mid
    assert after[(rejected, (("code", "delivery_timeout"), ("status", "503")))] == 1
    assert after[("pipeline_collector_events_accepted_total", ())] == 0
    assert after[("pipeline_collector_events_produced_total", ())] == 0


def test_each_collector_app_counts_in_its_own_registry(tmp_path: Path) -> None:
    settings = collector_settings(tmp_path)
    first = create_collector(settings, MemoryPublisher)
    second = create_collector(settings, MemoryPublisher)
    with TestClient(first) as a, TestClient(second) as b:
        assert a.post("/v1/track", json=event("m1"), auth=(WRITE_KEY, "")).status_code == 200
        assert scrape(a)[("pipeline_collector_events_accepted_total", ())] == 1
        assert scrape(b)[("pipeline_collector_events_accepted_total", ())] == 0


def api_settings(home: Path) -> Settings:
    return Settings(
        _env_file=None, home=home, api=ApiSettings(api_keys={"test": SecretStr(API_KEY)})
    )


def test_api_counts_requests_by_route_template_and_status(tmp_path: Path) -> None:
    requests = "pipeline_api_requests_total"
    customer = "/api/customers/{customer_id}"
    with TestClient(create_api(api_settings(tmp_path))) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/api/customers/cus_1").status_code == 401
        assert http.get("/api/customers/cus_2", headers={"X-API-Key": "wrong"}).status_code == 401
        # authenticated, but no warehouse yet
        assert http.get("/api/customers/cus_1", headers={"X-API-Key": API_KEY}).status_code == 503
        assert http.get("/no/such/path/42").status_code == 404
        got = scrape(http)

    def count(route: str, status: str) -> float:
        return got[(requests, (("method", "GET"), ("route", route), ("status", status)))]

    assert count("/health", "200") == 1
    assert count(customer, "401") == 2
    assert count(customer, "503") == 1
    assert count("unmatched", "404") == 1
    assert not any("cus_1" in dict(labels).get("route", "") for _, labels in got)
    latency = "pipeline_api_request_duration_seconds_count"
    assert got[(latency, (("method", "GET"), ("route", customer)))] == 3
    assert got[(latency, (("method", "GET"), ("route", "/health")))] == 1


def test_made_up_methods_share_one_label_and_every_api_answer_is_no_store(tmp_path: Path) -> None:
    """Anyone may send any method name: each must not become a series of its own. And no
    answer may be kept by a cache in front of the API (profiles carry personal data)."""
    requests = "pipeline_api_requests_total"
    with TestClient(create_api(api_settings(tmp_path))) as http:
        for i in range(5):
            assert http.request(f"BREW{i}", "/api/segments").status_code == 405
        answers = [
            http.get("/health"),
            http.get("/api/customers/cus_1", headers={"X-API-Key": API_KEY}),  # 503
            http.get("/api/customers/cus_1"),  # 401
            http.get("/no/such/path"),
        ]
        got = scrape(http)
    methods = {dict(labels)["method"] for name, labels in got if name == requests}
    assert methods == {"GET", "other"}
    assert (
        got[(requests, (("method", "other"), ("route", "/api/segments"), ("status", "405")))] == 5
    )
    assert [a.headers.get_list("cache-control") for a in answers] == [["no-store"]] * 4


def test_each_api_app_counts_in_its_own_registry(tmp_path: Path) -> None:
    requests = "pipeline_api_requests_total"
    health = (requests, (("method", "GET"), ("route", "/health"), ("status", "200")))
    with (
        TestClient(create_api(api_settings(tmp_path))) as a,
        TestClient(create_api(api_settings(tmp_path))) as b,
    ):
        a.get("/health")
        a.get("/health")
        assert scrape(a)[health] == 2
        assert health not in scrape(b)


@pytest.mark.parametrize("server", ["collector", "API"])
def test_a_started_server_runs_with_the_collector_tuned_and_serves_its_pauses(
    tmp_path: Path, server: str
) -> None:
    settings = collector_settings(tmp_path) if server == "collector" else api_settings(tmp_path)
    settings = settings.model_copy(update={"gc_young_threshold": 12_345})
    app = (
        create_collector(settings, MemoryPublisher)
        if server == "collector"
        else create_api(settings)
    )
    untuned = gc.get_threshold()
    full = ("pipeline_gc_pause_seconds_count", (("generation", "2"),))
    full_s = ("pipeline_gc_pause_seconds_sum", (("generation", "2"),))
    with TestClient(app) as http:
        # what exists once it started is out of the collector's reach; thresholds raised
        assert gc.get_threshold() == (12_345, 20, 100)
        assert gc.get_freeze_count() > 0
        before = scrape(http)
        gc.collect()
        after = scrape(http)
        families = text_string_to_metric_families(http.get("/metrics").text)
        pauses = next(f for f in families if f.name == "pipeline_gc_pause_seconds")
    assert after[full] >= before[full] + 1
    assert after[full_s] > before[full_s]
    assert f"in the {server}'s process since it started" in pauses.documentation
    # stopped: the collector as it was
    assert gc.get_threshold() == untuned
    assert gc.get_freeze_count() == 0
