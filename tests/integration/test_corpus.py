"""The bad-input corpus (tests/corpus) through the parser, the collector and the processor.

Every case must end as its manifest says: a typed failure or a valid event from
``parse_event``; a JSON error or an acknowledgement from the collector over real HTTP; a
dead letter or a stored event from the real processor, which keeps running afterwards.
Hostile strings that are legitimate data must come out escaped in rendered emails.
"""

from __future__ import annotations

import base64
import gzip
import json
import time
import typing
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from collector_helpers import KEYS, collector_settings, running_collector
from markupsafe import escape

from pipeline.catalog import Catalog, Product
from pipeline.emails import render_email
from pipeline.emails.render import one_line
from pipeline.events import CleanEvent, Failure, FailureReason
from pipeline.parsing import ParseLimits, parse_event
from pipeline.recommend import Recommendation
from pipeline.runner import Run, make_producer, pipeline_run, process_until_idle
from pipeline.schemas import default_registry
from pipeline.scoring import Profile, profile_from_dict
from pipeline.sendtime import SendTime

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
REASONS = frozenset(typing.get_args(FailureReason))
REQUIRED_CATEGORIES = {
    "malformed_json",
    "invalid_utf8",
    "oversize",
    "deep_nesting",
    "wrong_types",
    "commerce_values",
    "unknown_events",
    "missing_ids",
    "timestamps",
    "hostile_strings",
    "unicode",
    "duplicate_keys",
    "auth",
}
SENTINEL_USER = "cus_corpus_sentinel"


@dataclass(frozen=True)
class CorpusCase:
    """One manifest entry with its bytes."""

    name: str
    category: str
    description: str
    body: bytes
    status: int
    code: str | None
    processor: str
    collected: dict[str, int]
    endpoint: str
    auth: str
    headers: dict[str, str] = field(default_factory=dict)
    hostile: list[str] = field(default_factory=list)

    def accepted_events(self) -> list[dict[str, Any]]:
        """The events the collector took from this request (it answered 200)."""
        raw = gzip.decompress(self.body) if self.headers.get("Content-Encoding") else self.body
        body = orjson.loads(raw)
        events: list[dict[str, Any]] = body["batch"] if self.endpoint == "/v1/batch" else [body]
        return events


def load_corpus() -> list[CorpusCase]:
    manifest = json.loads((CORPUS / "cases.json").read_text())
    return [
        CorpusCase(
            name=entry["name"],
            category=entry["category"],
            description=entry["description"],
            body=(CORPUS / entry["file"]).read_bytes(),
            status=entry["status"],
            code=entry["code"],
            processor=entry["processor"],
            collected=entry["collected"],
            endpoint=entry["endpoint"],
            auth=entry["auth"],
            headers=entry["headers"],
            hostile=entry["hostile"],
        )
        for entry in manifest
    ]


CASES = load_corpus()
RAW_VALID = [c for c in CASES if c.processor == "valid"]
HOSTILE = sorted({text for c in CASES for text in c.hostile})


def sentinel(tag: str) -> bytes:
    """A valid event produced after the corpus: the processor must still take it."""
    return orjson.dumps(
        {
            "type": "track",
            "event": "Product Viewed",
            "messageId": f"sentinel-{tag}",
            "userId": SENTINEL_USER,
            "timestamp": "2025-06-02T12:00:00.000Z",
            "context": {"device": {"type": "server"}},
            "properties": {"product_id": "P00001"},
        }
    )


def test_corpus_is_large_and_covers_every_kind_of_bad_input() -> None:
    assert len(CASES) >= 100
    assert {c.category for c in CASES} >= REQUIRED_CATEGORIES
    assert len({c.name for c in CASES}) == len(CASES)
    outcomes = {c.processor for c in CASES}
    assert outcomes <= REASONS | {"valid"}
    # not properties of a raw message body: a forgotten customer, a malformed erasure request
    # (tests/integration/test_forget_e2e.py), a bad CRM record and a record the processor
    # fails on (tests/integration/test_pipeline_e2e.py)
    assert outcomes >= REASONS - {
        "suppressed",
        "bad_control",
        "bad_crm_record",
        "processing_failed",
    }
    assert {c.status for c in CASES} >= {200, 400, 401, 413, 415}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_parse_event_gives_the_expected_outcome(case: CorpusCase) -> None:
    now = time.time_ns() // 1_000_000
    result = parse_event(
        case.body,
        registry=REGISTRY,
        limits=ParseLimits(),
        now_ms=now,
        ingested_ms=now,
        topic="events.raw",
        partition=0,
        offset=7,
    )
    if case.processor == "valid":
        assert isinstance(result, CleanEvent), getattr(result, "detail", "")
        orjson.dumps(result.to_dict())
        return
    assert isinstance(result, Failure)
    assert (result.reason, case.name) == (case.processor, case.name), result.detail
    assert result.detail
    assert base64.b64decode(result.raw_b64) == case.body[:65536]
    orjson.dumps(result.to_dict())


REGISTRY = default_registry()


# Through the collector over HTTP, then through the processor.


@dataclass
class CollectorOutcome:
    run: Run
    responses: dict[str, httpx.Response]


def _auth(case: CorpusCase) -> tuple[httpx.Auth | None, dict[str, str]]:
    headers = {"Content-Type": "application/json", **case.headers}
    if case.auth == "header":
        return httpx.BasicAuth(KEYS["storefront"], ""), headers
    if case.auth == "wrong":
        return httpx.BasicAuth("wk_not_a_key", ""), headers
    if case.auth == "malformed":
        headers["Authorization"] = "Basic !!not-base64!!"
    return None, headers


def _wait_for(run: Run, raw_in: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while run.metrics.raw_in < raw_in:
        if time.monotonic() > deadline:
            raise TimeoutError(f"processor read {run.metrics.raw_in} of {raw_in} messages")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def through_collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CollectorOutcome]:
    # Rate limits have their own tests; here they must not turn a 400 into a timing-dependent 429.
    settings = collector_settings(
        tmp_path_factory.mktemp("corpus-collector") / "home",
        rate_limit_events_per_s=1e6,
        rate_limit_burst=1_000_000,
    )
    with pipeline_run(settings) as run, running_collector(settings, run.address) as url:
        responses: dict[str, httpx.Response] = {}
        with httpx.Client(base_url=url, timeout=30) as http:
            for case in CASES:
                auth, headers = _auth(case)
                responses[case.name] = http.post(
                    case.endpoint,
                    content=case.body,
                    headers=headers,
                    auth=auth or httpx.USE_CLIENT_DEFAULT,
                )
            accepted = sum(
                len(c.accepted_events()) for c in CASES if responses[c.name].status_code == 200
            )

            def feed() -> None:
                _wait_for(run, accepted)
                reply = http.post(
                    "/v1/track",
                    content=sentinel("collector"),
                    auth=(KEYS["storefront"], ""),
                )
                assert reply.status_code == 200, reply.text

            process_until_idle(run, expected_raw=accepted + 1, feed=feed, timeout_s=300)
        yield CollectorOutcome(run, responses)


@pytest.mark.integration
def test_collector_answers_each_case_with_its_status_and_error_code(
    through_collector: CollectorOutcome,
) -> None:
    wrong = []
    for case in CASES:
        response = through_collector.responses[case.name]
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        if response.status_code == 200:
            assert body == {"success": True}
            got = (200, None)
        else:
            assert body["success"] is False
            assert body["error"]["message"]
            got = (response.status_code, body["error"]["code"])
        if got != (case.status, case.code):
            wrong.append((case.name, got, (case.status, case.code)))
    assert wrong == []


@pytest.mark.integration
def test_accepted_cases_end_as_dead_letters_or_events_as_expected(
    through_collector: CollectorOutcome,
) -> None:
    wh = through_collector.run.warehouse
    stored = set(wh.query("SELECT message_id FROM events")["message_id"])
    rows = wh.query("SELECT message_id, reason FROM dead_letters").itertuples(index=False)
    letters: dict[str | None, str] = {row[0]: row[1] for row in rows}
    assert None not in letters, "every accepted event carries a messageId"
    wrong = []
    for case in CASES:
        if through_collector.responses[case.name].status_code != 200:
            continue
        outcomes: Counter[str] = Counter()
        for event in case.accepted_events():
            message_id = event["messageId"]
            if message_id in stored:
                outcomes["valid"] += 1
            else:
                outcomes[letters.get(message_id[:200], "missing")] += 1
        if outcomes != Counter(case.collected):
            wrong.append((case.name, dict(outcomes), case.collected))
    assert wrong == []
    metrics = through_collector.run.metrics
    assert metrics.dead_lettered_total == len(letters)


@pytest.mark.integration
def test_processor_kept_running_after_the_collected_corpus(
    through_collector: CollectorOutcome,
) -> None:
    profile = through_collector.run.warehouse.get_profile(SENTINEL_USER)
    assert profile["event_count"] == 1


# Raw bytes straight to the raw topic, then through the processor.


@dataclass
class RawOutcome:
    run: Run


@pytest.fixture(scope="module")
def raw_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RawOutcome]:
    settings = collector_settings(tmp_path_factory.mktemp("corpus-raw") / "home")
    with pipeline_run(settings) as run:
        producer = make_producer(settings, run.address)

        def feed() -> None:
            for case in CASES:
                producer.produce(settings.topics.raw, value=case.body)
            assert producer.flush(30) == 0
            _wait_for(run, len(CASES))
            producer.produce(settings.topics.raw, value=sentinel("raw"), key=SENTINEL_USER)
            assert producer.flush(30) == 0

        process_until_idle(run, expected_raw=len(CASES) + 1, feed=feed, timeout_s=300)
        yield RawOutcome(run)


@pytest.mark.integration
def test_every_raw_case_is_a_typed_dead_letter_or_a_stored_event(raw_run: RawOutcome) -> None:
    wh = raw_run.run.warehouse
    letters = wh.query("SELECT reason, raw_b64, dead_letter_id FROM dead_letters")
    by_raw = {base64.b64decode(str(r.raw_b64)): str(r.reason) for r in letters.itertuples()}
    assert set(letters["reason"]) <= REASONS
    assert letters["dead_letter_id"].str.startswith("events.raw:").all()
    invalid = [c for c in CASES if c.processor != "valid"]
    assert len(letters) == len(invalid)
    wrong = [
        (c.name, by_raw.get(c.body[:65536], "missing"), c.processor)
        for c in invalid
        if by_raw.get(c.body[:65536]) != c.processor
    ]
    assert wrong == []
    stored = set(wh.query("SELECT message_id FROM events")["message_id"])
    expected = {orjson.loads(c.body)["messageId"] for c in RAW_VALID} | {"sentinel-raw"}
    assert stored == expected
    assert raw_run.run.metrics.dead_lettered_total == len(invalid)


def _owner(payload: dict[str, Any]) -> str:
    user = payload.get("userId")
    return user if user else f"anon:{payload['anonymousId']}"


@pytest.mark.integration
def test_nothing_from_an_invalid_case_reaches_a_profile(raw_run: RawOutcome) -> None:
    wh = raw_run.run.warehouse
    owners = Counter(_owner(orjson.loads(c.body)) for c in RAW_VALID)
    owners[SENTINEL_USER] += 1
    profiles = wh.query("SELECT customer_id, event_count FROM profiles WHERE merged_into IS NULL")
    found = dict(zip(profiles["customer_id"], profiles["event_count"].astype(int), strict=True))
    assert found == dict(owners)
    assert wh.get_profile(SENTINEL_USER)["event_count"] == 1


# Rendering: hostile strings that are valid data must come out escaped.


class _Structure(HTMLParser):
    """Tags, attribute names and URL-ish attribute values of an HTML document."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.extend((name, value or "") for name, value in attrs)


def structure(html: str) -> tuple[list[str], list[str]]:
    parser = _Structure()
    parser.feed(html)
    parser.close()
    return parser.tags, [name for name, _ in parser.attributes]


SEND = SendTime(
    send_at_ms=1_748_800_000_000,
    hour_of_week=20,
    timezone="UTC",
    confidence=0.5,
    probability=0.05,
    observations=10.0,
    fallback=False,
)


def _hostile_catalog(text: str) -> Catalog:
    return Catalog([Product("H1", text, text, text, text, text, 10.0, "EUR", 3)])


def _render(profile: Profile, catalog: Catalog, reason: str) -> str:
    email = render_email(
        profile,
        [Recommendation(next(iter(catalog)), 1.0, reason, "affinity")],
        SEND,
        catalog,
        campaign_id="corpus",
        unsubscribe_url="https://shop.example.com/unsubscribe?u=1",
        as_of_ms=SEND.send_at_ms,
    )
    assert "\n" not in email.subject and "\r" not in email.subject
    assert "\n" not in email.preheader and "\r" not in email.preheader
    for line in email.text.splitlines():
        assert not line.lower().startswith("bcc:")
    return email.html


def _assert_inert(html: str, baseline: str) -> None:
    lowered = html.lower()
    assert "<script" not in lowered and "<img" not in lowered and "<svg" not in lowered
    assert "<iframe" not in lowered
    parser = _Structure()
    parser.feed(html)
    for name, value in parser.attributes:
        assert not name.startswith("on"), name
        assert not value.strip().lower().startswith("javascript:"), value
    assert structure(html) == structure(baseline)


@pytest.mark.integration
def test_emails_of_stored_profiles_with_hostile_traits_escape_everything(
    raw_run: RawOutcome,
) -> None:
    wh = raw_run.run.warehouse
    catalog = raw_run.run.catalog
    benign = profile_from_dict(wh.get_profile(SENTINEL_USER))
    benign.traits = {"firstName": "Emma"}
    baseline = _render(benign, catalog, "Because you viewed dresses")
    with_names = [c for c in RAW_VALID if c.hostile and b'"firstName"' in c.body]
    assert len(with_names) >= 20
    for case in with_names:
        payload = orjson.loads(case.body)
        profile = profile_from_dict(wh.get_profile(_owner(payload)))
        name = profile.traits["firstName"]
        assert name == payload["traits"]["firstName"], "traits are stored as sent"
        html = _render(profile, catalog, "Because you viewed dresses")
        _assert_inert(html, baseline)
        assert f"Hi {escape(one_line(name))}," in html


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_strings_in_names_products_and_reasons_are_escaped(text: str) -> None:
    profile = Profile(customer_id=text, is_anonymous=False, traits={"firstName": text})
    plain = Profile(customer_id="c", is_anonymous=False, traits={"firstName": "Emma"})
    benign = _hostile_catalog("Linen dress")
    html = _render(profile, _hostile_catalog(text), text)
    _assert_inert(html, _render(plain, benign, "Because you viewed dresses"))
    assert str(escape(one_line(text))) in html


def test_render_check_would_catch_unescaped_markup() -> None:
    parser_tags, _ = structure("<p>Hi <img src=x onerror=alert(1)>,</p>")
    assert "img" in parser_tags
    with pytest.raises(AssertionError):
        _assert_inert("<p>Hi <b onclick=x>,</p>", "<p>Hi ,</p>")
