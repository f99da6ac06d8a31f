"""The API app over a small store: which customer ids it serves, and its error answers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from starlette.testclient import TestClient

from pipeline.api.app import create_app
from pipeline.api.cache import Refreshing
from pipeline.scoring import new_profile, profile_to_dict
from pipeline.settings import Settings
from pipeline.stores.local import LocalWarehouse

API_KEY = "ak_unit_0123456789abcdef"
ODD_IDS = (
    "o'brien@example.com",  # an e-mail address used as the userId
    "jane doe",
    "josé",
    "100%",
    "a#b?c=d&e",
    "a+b",
    "semi;colon",
    "x" * 200,  # the longest userId the event schema accepts
    "anon:" + "d" * 200,  # and the longest anonymousId's profile
)


@pytest.fixture
def http(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(_env_file=None, home=tmp_path, api={"api_keys": {"unit": API_KEY}})
    with LocalWarehouse(settings.warehouse_path) as wh:
        wh.write_profiles(
            profile_to_dict(new_profile(cid, is_anonymous=cid.startswith("anon:")))
            for cid in ("cus_1", *ODD_IDS)
        )
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False, headers={"X-API-Key": API_KEY}) as c:
        yield c


@pytest.mark.parametrize("customer_id", ODD_IDS)
def test_a_stored_customer_id_in_any_characters_is_served(
    http: TestClient, customer_id: str
) -> None:
    """The pipeline stores whatever id a client sent (up to 200 characters); the API must serve
    every one of them, percent-encoded in the path, not refuse it as an invalid id."""
    path = f"/api/customers/{quote(customer_id, safe='')}"
    response = http.get(path)
    assert response.status_code == 200, response.text
    assert response.json()["customer_id"] == customer_id
    assert http.get(f"{path}/send-time").status_code == 200


def test_customer_ids_too_long_or_unknown_are_json_errors(http: TestClient) -> None:
    too_long = http.get("/api/customers/" + "x" * 513)
    assert too_long.status_code == 422
    assert too_long.json()["error"] == "validation_error"
    unknown = http.get("/api/customers/" + quote("nobody 😶", safe=""))
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "customer_not_found"
    slash = http.get("/api/customers/a%2Fb")  # decoded before routing: no such route
    assert slash.status_code == 404
    assert slash.json()["error"] == "not_found"


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "text/json"]
)
def test_a_render_body_not_sent_as_json_is_a_415_naming_the_type(
    http: TestClient, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = http.post(
        "/api/campaigns/spring/render", content=b'{"segment": "vip"}', headers=headers
    )
    assert response.status_code == 415, response.text
    body = response.json()
    assert body["error"] == "unsupported_media_type"
    assert "application/json" in body["detail"]
    assert (repr(content_type) if content_type else "not none") in body["detail"]


def test_a_json_render_body_is_accepted_and_credentials_are_checked_first(
    http: TestClient,
) -> None:
    for content_type in ("application/json", "application/json; charset=utf-8", "app/x+json"):
        response = http.post(
            "/api/campaigns/spring/render",
            content=b'{"segment": "vip"}',
            headers={"Content-Type": content_type},
        )
        expected = 415 if content_type == "app/x+json" else 200
        assert response.status_code == expected, (content_type, response.text)
    anonymous = http.post(
        "/api/campaigns/spring/render",
        content=b'{"segment": "vip"}',
        headers={"Content-Type": "text/plain", "X-API-Key": ""},
    )
    assert anonymous.status_code == 401


def test_an_unexpected_error_is_a_json_500_naming_nothing_internal(http: TestClient) -> None:
    def broken(customer_id: str) -> None:
        raise RuntimeError("SELECT profile FROM profiles in /srv/pipeline/warehouse.db")

    http.app.state.service.customer = broken  # type: ignore[attr-defined]
    response = http.get("/api/customers/cus_1")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert response.json() == {
        "error": "internal_error",
        "detail": "the API failed to answer; retry later",
    }


def test_the_first_signals_build_does_not_stop_the_event_loop(tmp_path: Path) -> None:
    """An API started before the store existed builds the recommendation signals at the first
    request (seconds over a large store): meanwhile /health must still answer at once."""
    settings = Settings(_env_file=None, home=tmp_path, api={"api_keys": {"unit": API_KEY}})
    app = create_app(settings)
    service = app.state.service
    building, release = threading.Event(), threading.Event()
    build = service.signals._build

    def slow_build() -> Any:
        building.set()
        release.wait(5)  # far longer than /health may take
        return build()

    service.signals = Refreshing("signals", slow_build, 60.0)
    with TestClient(app, headers={"X-API-Key": API_KEY}) as http:
        # no store at start-up, so nothing was built: the processor creates it afterwards
        assert service.signals.built_ms is None
        with LocalWarehouse(settings.warehouse_path) as wh:
            wh.write_profiles([profile_to_dict(new_profile("cus_1", is_anonymous=False))])
        answers: list[int] = []
        first = threading.Thread(
            target=lambda: answers.append(
                http.get("/api/customers/cus_1/recommendations").status_code
            )
        )
        first.start()
        assert building.wait(5)
        started = time.monotonic()
        health = http.get("/health")
        waited = time.monotonic() - started
        release.set()
        first.join(10)
    assert health.status_code == 200
    assert waited < 2.0, f"/health waited {waited:.1f}s for the signals build"
    assert answers == [200]
