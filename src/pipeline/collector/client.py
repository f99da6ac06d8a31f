"""Sending raw messages through the collector over HTTP, as an SDK would (used by the simulator).

Messages go in ``/v1/batch`` requests of at most 50 events and 500 KB. A 400 naming an event's
index drops that event as rejected (with the collector's reason) and resends the rest; a body
that is not even JSON is sent alone so that the collector names its problem; 429 and 503 are
retried after ``Retry-After``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from pipeline.delivery.backoff import parse_retry_after
from pipeline.errors import PipelineError
from pipeline.simulate import RawMessage

MAX_BATCH_EVENTS = 50
MAX_BATCH_BYTES = 500 * 1024


@dataclass(frozen=True, slots=True)
class Rejection:
    """A message the collector refused at the edge, and its reason code."""

    position: int
    code: str
    message: str


@dataclass
class HttpSendReport:
    """What the collector accepted (acknowledged by the broker) and what it refused."""

    accepted: list[int] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    requests: int = 0
    retries: int = 0
    seconds: float = 0.0

    @property
    def accepted_count(self) -> int:
        return len(self.accepted)

    def rejected_by_code(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.rejected:
            counts[r.code] = counts.get(r.code, 0) + 1
        return counts


def send_via_http(
    messages: Sequence[RawMessage],
    url: str,
    write_key: str,
    *,
    keep_sent_at: bool = False,
    max_retries: int = 20,
    timeout_s: float = 30.0,
) -> HttpSendReport:
    """POST ``messages`` to the collector at ``url`` (e.g. ``http://127.0.0.1:8088``).

    Simulated messages carry historical times: their ``sentAt`` is dropped unless
    ``keep_sent_at``, so that the collector keeps each ``timestamp`` instead of moving it
    to the receive time by skew correction.
    """
    report = HttpSendReport()
    start = time.monotonic()
    with httpx.Client(base_url=url.rstrip("/"), auth=(write_key, ""), timeout=timeout_s) as client:
        pending: list[tuple[int, dict[str, Any]]] = []
        size = 0
        for position, msg in enumerate(messages):
            try:
                event = orjson.loads(msg.value)
            except orjson.JSONDecodeError:
                event = None
            if type(event) is not dict:
                _send_raw(client, position, msg.value, report, max_retries)
                continue
            if not keep_sent_at:
                event.pop("sentAt", None)
            event_size = len(orjson.dumps(event)) + 1
            if pending and (
                len(pending) >= MAX_BATCH_EVENTS or size + event_size > MAX_BATCH_BYTES
            ):
                _send_batch(client, pending, report, max_retries)
                pending, size = [], 0
            pending.append((position, event))
            size += event_size
        if pending:
            _send_batch(client, pending, report, max_retries)
    report.seconds = time.monotonic() - start
    return report


def _post(
    client: httpx.Client, path: str, content: bytes, report: HttpSendReport, max_retries: int
) -> httpx.Response:
    for attempt in range(max_retries + 1):
        report.requests += 1
        response = client.post(path, content=content, headers={"Content-Type": "application/json"})
        if response.status_code not in (429, 503) or attempt == max_retries:
            return response
        report.retries += 1
        wait = parse_retry_after(response.headers.get("Retry-After"), time.time())
        time.sleep(min(1.0 if wait is None else wait, 10.0))
    raise AssertionError("unreachable")


def _send_raw(
    client: httpx.Client, position: int, body: bytes, report: HttpSendReport, max_retries: int
) -> None:
    response = _post(client, "/v1/track", body, report, max_retries)
    if response.status_code == 200:
        report.accepted.append(position)
        return
    code, message = _error_of(response)
    report.rejected.append(Rejection(position, code, message))


def _send_batch(
    client: httpx.Client,
    events: list[tuple[int, dict[str, Any]]],
    report: HttpSendReport,
    max_retries: int,
) -> None:
    while events:
        body = orjson.dumps({"batch": [event for _, event in events]})
        response = _post(client, "/v1/batch", body, report, max_retries)
        if response.status_code == 200:
            report.accepted.extend(position for position, _ in events)
            return
        code, message = _error_of(response)
        index = _index_of(response)
        if response.status_code != 400 or index is None or not 0 <= index < len(events):
            if response.status_code in (429, 503):
                raise PipelineError(f"collector unavailable after {max_retries} retries: {message}")
            report.rejected.extend(Rejection(position, code, message) for position, _ in events)
            return
        report.rejected.append(Rejection(events[index][0], code, message))
        events = events[:index] + events[index + 1 :]


def _error_of(response: httpx.Response) -> tuple[str, str]:
    try:
        error = response.json()["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return f"http_{response.status_code}", response.text[:200]


def _index_of(response: httpx.Response) -> int | None:
    try:
        index = response.json()["error"].get("index")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return index if type(index) is int else None
