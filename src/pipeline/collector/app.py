"""The collector's ASGI app: Segment's HTTP Tracking API in front of the raw topic.

``POST /v1/batch|track|identify|page|screen|alias|group`` answer ``200 {"success": true}``
only after the broker acknowledged every event of the request; every refusal is
``{"success": false, "error": {"code", "message"[, "index"]}}`` with its status.
``GET /metrics`` serves accepted, refused and produced counts in the Prometheus text format.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from pipeline.collector.auth import WriteKeys, write_key_from_authorization
from pipeline.collector.enrich import utc_now_ms
from pipeline.collector.errors import BrokerUnavailableError, RequestRejected
from pipeline.collector.intake import events_of, parse_body, prepare_messages
from pipeline.collector.limits import Clock, RateLimiter, read_body
from pipeline.collector.publish import Publisher
from pipeline.collector.storefront import register_storefront
from pipeline.gc_pauses import tuned_and_counted
from pipeline.gdpr import SuppressedIds, close_source, is_suppressed, suppression_source
from pipeline.observability import CollectorMetrics, metrics_response
from pipeline.settings import Settings

log = logging.getLogger(__name__)

SINGLE_EVENT_TYPES = ("track", "identify", "page", "screen", "alias", "group")
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
_SUCCESS = orjson.dumps({"success": True})


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def create_app(
    settings: Settings,
    producer_factory: Callable[[], Publisher],
    *,
    clock_ms: Callable[[], int] = utc_now_ms,
    rate_clock: Clock | None = None,
    suppressed: SuppressedIds | None = None,
) -> FastAPI:
    """The collector app; ``producer_factory`` is called once at start-up, closed at shutdown.

    ``suppressed`` (default: this machine's suppression file) says whose events to drop.
    """
    cfg = settings.collector
    keys = WriteKeys(cfg.write_keys)
    limiter = (
        RateLimiter(cfg.rate_limit_events_per_s, cfg.rate_limit_burst, rate_clock)
        if rate_clock is not None
        else RateLimiter(cfg.rate_limit_events_per_s, cfg.rate_limit_burst)
    )
    topic = settings.topics.raw
    publishers: list[Publisher] = []
    forgotten_ids = suppressed or suppression_source(settings)
    metrics = CollectorMetrics()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        publishers.append(producer_factory())
        log.info("collector ready: %d write keys, raw topic %s", len(keys), topic)
        try:
            # from here on a request allocates only short-lived objects (pipeline.gc_pauses)
            with tuned_and_counted(metrics.gc, settings.gc_young_threshold):
                yield
        finally:
            publishers.pop().close()
            close_source(forgotten_ids)

    app = FastAPI(
        title="pipeline collector",
        description="Segment-compatible HTTP tracking API.",
        lifespan=lifespan,
        openapi_url=None,
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(cfg.cors_origins),
        allow_methods=["POST", "GET", "OPTIONS"],
        allow_headers=["Content-Type", "Authorization", "Content-Encoding"],
        expose_headers=["Retry-After"],
        max_age=600,
    )

    allowed_origins = frozenset(cfg.cors_origins)

    def check_origin(request: Request) -> None:
        """A browser names the page's origin on every POST: only the collector's own and the
        allowlist may send (CORS alone would only stop the page reading the answer, and a
        text/plain POST needs no preflight). Server-side clients send no Origin."""
        origin = request.headers.get("origin")
        if origin is None or origin in allowed_origins or "*" in allowed_origins:
            return
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:  # "http://[::1": refused like any other origin not allowed
            netloc = None
        if netloc is not None and netloc == request.headers.get("host"):
            return  # same origin (the storefront the collector serves)
        raise RequestRejected(
            403, "origin_not_allowed", f"browsers on {origin[:100]!r} may not send events here"
        )

    async def ingest(request: Request, endpoint_type: str | None) -> Response:
        received_ms = clock_ms()
        source: str | None = None
        charged = 0  # events charged to the source's rate limit, given back if refused after
        try:
            check_origin(request)
            header_key = write_key_from_authorization(request.headers.get("authorization"))
            if header_key is not None:
                source = keys.source_for(header_key)
            raw = await read_body(
                request.stream(),
                content_length=request.headers.get("content-length"),
                content_encoding=request.headers.get("content-encoding"),
                limit=cfg.max_batch_bytes,
            )
            body = parse_body(raw)
            if source is None:
                body_key = body.pop("writeKey", None)
                source = keys.source_for(body_key if type(body_key) is str else None)
            events, batch_sent_at = events_of(body, endpoint_type)
            limiter.check(source, max(1, len(events)))
            charged = max(1, len(events))
            messages = prepare_messages(
                events,
                endpoint_type=endpoint_type,
                source_id=source,
                received_ms=received_ms,
                batch_sent_at=batch_sent_at,
                max_event_bytes=settings.max_event_bytes,
            )
            forgotten = forgotten_ids()
            if forgotten:
                # a forgotten customer's new events are acknowledged and dropped, never stored
                messages = [
                    m
                    for m, e in zip(messages, events, strict=True)
                    if not is_suppressed(
                        forgotten,
                        user_id=e.get("userId"),
                        anonymous_id=e.get("anonymousId"),
                        previous_id=e.get("previousId") if e.get("type") == "alias" else None,
                    )
                ]
            if messages:
                started = time.perf_counter()
                await publishers[0].send(topic, messages)
                metrics.produce_ack_seconds.observe(time.perf_counter() - started)
                metrics.events_produced.inc(len(messages))
        except RequestRejected as exc:
            if charged and source is not None:
                limiter.refund(source, charged)
            log.info("refused %s from source %s: %s", request.url.path, source, exc.code)
            metrics.rejected(exc.status, exc.code)
            headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
            return _json(exc.status, exc.body(), headers)
        except ClientDisconnect:
            # the client went away mid-body (a page unloading, a dropped mobile connection):
            # nothing was read whole, none charged, and nobody reads an answer: not a bug
            log.info("client left during %s from source %s", request.url.path, source)
            metrics.rejected(499, "client_disconnected")
            return Response(status_code=499)
        except BrokerUnavailableError as exc:
            if charged and source is not None:
                limiter.refund(source, charged)
            log.warning("503 for source %s: %s", source, exc.message)
            metrics.rejected(503, exc.code)
            error = {"code": exc.code, "message": exc.message}
            headers = {"Retry-After": str(cfg.retry_after_s)}
            return _json(503, {"success": False, "error": error}, headers)
        metrics.events_accepted.inc(len(events))
        return Response(_SUCCESS, 200, media_type="application/json")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """404, 405 and the like in the collector's error shape."""
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        body = {"success": False, "error": {"code": code, "message": str(exc.detail)}}
        return _json(exc.status_code, body, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        """A bad query parameter (the storefront's) in the collector's error shape."""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()
        )
        body = {"success": False, "error": {"code": "invalid_request", "message": problems}}
        return _json(422, body)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        """A bug: a JSON 500 (the traceback goes to the log), never a text page."""
        log.error("unexpected error on %s", request.url.path, exc_info=exc)
        error = {"code": "internal_error", "message": "the collector failed; retry later"}
        return _json(500, {"success": False, "error": error})

    @app.post("/v1/batch")
    async def batch(request: Request) -> Response:
        """A batch of events of any type: ``{"batch": [...], "sentAt": ...}``."""
        return await ingest(request, None)

    def single(kind: str) -> Callable[[Request], object]:
        async def endpoint(request: Request) -> Response:
            return await ingest(request, kind)

        endpoint.__name__ = kind
        endpoint.__doc__ = f"One {kind} event."
        return endpoint

    for kind in SINGLE_EVENT_TYPES:
        app.add_api_route(f"/v1/{kind}", single(kind), methods=["POST"])
        # analytics.js posts to Segment's one-letter aliases: /v1/t, /v1/p, /v1/i, ... and /v1/b.
        app.add_api_route(f"/v1/{kind[0]}", single(kind), methods=["POST"], include_in_schema=False)
    app.add_api_route("/v1/b", batch, methods=["POST"], include_in_schema=False)
    register_storefront(app, settings)

    @app.get("/health")
    async def health() -> Response:
        """200 when the broker answers, 503 otherwise: readiness (take no traffic meanwhile)."""
        ok = bool(publishers) and await publishers[0].healthy()
        body = {"status": "ok" if ok else "unavailable", "broker": ok, "topic": topic}
        return _json(200 if ok else 503, body)

    @app.get("/livez")
    async def livez() -> Response:
        """200 while this process can serve once the broker answers, whether or not it does
        now: liveness, so that a broker outage does not restart every collector (a restart
        cannot mend the broker), while a dead delivery-report thread does."""
        ok = bool(publishers) and publishers[0].alive()
        return _json(200 if ok else 503, {"status": "alive" if ok else "dead"})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        """Accepted, refused and produced events in the Prometheus text format."""
        return metrics_response(metrics.registry)

    return app
