"""The FastAPI app: routes translate HTTP to :class:`PersonalizationService` calls and back.

Every ``/api`` route needs an API key (``X-API-Key``) or an OAuth2 bearer JWT; ``/health``,
``/openapi.json``, ``/docs`` and ``/metrics`` (requests by route and status, latency, in the
Prometheus text format) are open. Errors are JSON ``{"error", "detail"}`` bodies.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.api.auth import AuthenticationFailed, Authenticator, Principal
from pipeline.api.models import (
    CustomerResponse,
    ErrorBody,
    FollowStatus,
    HealthResponse,
    RecommendationsResponse,
    RecommendedItem,
    RenderedCampaignEmail,
    RenderRequest,
    RenderResponse,
    Score,
    SegmentSize,
    SegmentsResponse,
    SendTimeResponse,
)
from pipeline.api.service import PersonalizationService, wall_clock_ms
from pipeline.errors import ProfileNotFoundError, StoreError
from pipeline.gc_pauses import tuned_and_counted
from pipeline.observability import ApiMetrics, RequestMetricsMiddleware, metrics_response
from pipeline.settings import Settings
from pipeline.stores.follow import StoreFollower, follow_topics

log = logging.getLogger(__name__)
_CATCH_UP_WAIT_S = 60.0  # at start-up, for a copy of the store kept from the topics

CAMPAIGN_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
NO_STORE = {"Cache-Control": "no-store"}
_PREVIEW_HEADERS = {
    **NO_STORE,
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src https: data:"
    ),
    "X-Content-Type-Options": "nosniff",
}

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="An API key configured in api.api_keys."
)
bearer_token = HTTPBearer(
    auto_error=False,
    bearerFormat="JWT",
    description="An OAuth2 access token (JWT, HS256 or RS256) for the configured audience.",
)

CUSTOMER_ID_MAX_CHARS = 512
"""Longest customer id a path may name. Ids are whatever the pipeline stored: a ``userId`` or
``anonymousId`` (up to 200 characters, ``anon:`` before a device's) or a CRM record's id, in
any characters (an e-mail address as ``o'brien@example.com``, a name with spaces, non-ASCII),
so only the length is bounded; a client percent-encodes the id in the path. An id holding
``/`` cannot be named: the server decodes ``%2F`` before routing (a JSON 404)."""

CustomerId = Annotated[
    str,
    PathParam(
        min_length=1,
        max_length=CUSTOMER_ID_MAX_CHARS,
        description="Customer id (percent-encoded), or anon:<anonymousId>.",
    ),
]


def _error(status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"error": code, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, headers=NO_STORE)


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


async def _service(request: Request) -> PersonalizationService:
    service: PersonalizationService = request.app.state.service
    return service


async def _principal(
    request: Request,
    api_key: Annotated[str | None, Security(api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_token)],
) -> Principal:
    authenticator: Authenticator = request.app.state.authenticator
    return authenticator.authenticate(api_key, bearer.credentials if bearer else None)


ServiceDep = Annotated[PersonalizationService, Depends(_service)]


async def _json_body(request: Request) -> None:
    """A 415 for a body sent as anything but JSON (``curl -d`` sends a form's type): FastAPI
    would not parse it, and answer a 422 saying the body is not an object."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    major, _, subtype = media_type.partition("/")
    if major != "application" or not (subtype == "json" or subtype.endswith("+json")):
        sent = repr(media_type) if media_type else "none"
        raise StarletteHTTPException(
            415, f"the body must be sent as JSON (Content-Type: application/json), not {sent}"
        )


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or invalid API key or bearer token."},
    422: {"model": ErrorBody, "description": "A parameter or the body is not valid."},
    503: {"model": ErrorBody, "description": "The profile store is not available yet."},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No profile for this customer id."}
}

router = APIRouter(prefix="/api", dependencies=[Depends(_principal)], responses=_ERRORS)
T = TypeVar("T")


async def _answer(service: PersonalizationService, call: Callable[..., T], *args: Any) -> T:
    """``call(*args)`` of the service, on the event loop once its caches are built: a request
    then takes about a millisecond, and a hop to the thread pool added 0.6-0.9 ms to the p50
    (three bench runs). Before (the API started ahead of the store), in the thread pool: the
    first build reads up to ``signals_max_events`` events, seconds in which every request,
    /health (the liveness probe) included, would wait."""
    if service.warm():
        return call(*args)
    return await run_in_threadpool(call, *args)


@router.get("/customers/{customer_id}", responses=_NOT_FOUND, tags=["customers"])
async def get_customer(customer_id: CustomerId, service: ServiceDep) -> CustomerResponse:
    """The stored profile with its interaction score, intent stage and segments now."""
    view = await _answer(service, service.customer, customer_id)
    s = view.score
    return CustomerResponse(
        customer_id=view.profile.customer_id,
        requested_id=view.requested_id,
        at_ms=view.at_ms,
        score=Score(score=s.score, recency=s.recency, frequency=s.frequency, monetary=s.monetary),
        intent_stage=view.intent_stage,
        segments=sorted(view.segments),
        profile=view.stored,
    )


@router.get("/customers/{customer_id}/recommendations", responses=_NOT_FOUND, tags=["customers"])
async def get_recommendations(
    customer_id: CustomerId,
    service: ServiceDep,
    k: Annotated[int, Query(ge=1, le=50, description="How many products.")] = 10,
) -> RecommendationsResponse:
    """Up to ``k`` diverse products for the customer, each with the reason it was picked."""
    profile, at_ms, recs = await _answer(service, service.recommendations, customer_id, k)
    products = service.catalog
    items = []
    for rec in recs:
        p = products[rec.product_id]
        items.append(
            RecommendedItem(
                product_id=p.product_id,
                name=p.name,
                brand=p.brand,
                category=p.category,
                price=p.price,
                currency=p.currency,
                score=rec.score,
                reason=rec.reason,
                source=rec.source,
            )
        )
    return RecommendationsResponse(
        customer_id=profile.customer_id,
        at_ms=at_ms,
        k=k,
        cold_start=all(r.source == "popular" for r in recs),
        items=items,
    )


@router.get("/customers/{customer_id}/send-time", responses=_NOT_FOUND, tags=["customers"])
async def get_send_time(customer_id: CustomerId, service: ServiceDep) -> SendTimeResponse:
    """The next start of the hour the customer most likely reads email, with its confidence."""
    profile, st = await _answer(service, service.send_time, customer_id)
    return SendTimeResponse(
        customer_id=profile.customer_id,
        send_at=st.send_at,
        send_at_ms=st.send_at_ms,
        local_time=st.local_time,
        timezone=st.timezone,
        hour_of_week=st.hour_of_week,
        confidence=st.confidence,
        probability=st.probability,
        observations=st.observations,
        fallback=st.fallback,
    )


@router.get(
    "/customers/{customer_id}/email",
    response_class=HTMLResponse,
    responses={**_NOT_FOUND, 200: {"content": {"text/html": {}}, "description": "The HTML."}},
    tags=["customers"],
)
async def get_email(
    customer_id: CustomerId,
    service: ServiceDep,
    campaign: Annotated[
        str | None, Query(pattern=CAMPAIGN_PATTERN, description="Campaign id (default: preview).")
    ] = None,
) -> HTMLResponse:
    """The HTML part of the email the customer would get if it were rendered now."""
    campaign_id = campaign or service.config.default_campaign
    email = await _answer(service, service.email, customer_id, campaign_id)
    return HTMLResponse(email.html, headers=_PREVIEW_HEADERS)


@router.post(
    "/campaigns/{campaign_id}/render",
    dependencies=[Depends(_json_body)],
    responses={415: {"model": ErrorBody, "description": "The body is not sent as JSON."}},
    tags=["campaigns"],
)
async def render_campaign(
    campaign_id: Annotated[str, PathParam(pattern=CAMPAIGN_PATTERN)],
    body: RenderRequest,
    service: ServiceDep,
) -> RenderResponse:
    """Render the campaign for the members of a segment (as of now); subjects and snapshots."""
    if not service.has_segment(body.segment):
        raise _UnknownSegment(body.segment)
    limit = min(body.limit, service.config.render_limit_max)
    result = await run_in_threadpool(service.render_campaign, campaign_id, body.segment, limit)
    return RenderResponse(
        campaign_id=result.campaign_id,
        segment=result.segment,
        at_ms=result.at_ms,
        members=result.members,
        rendered=len(result.emails),
        emails=[
            RenderedCampaignEmail(
                customer_id=e.email.customer_id,
                to=e.to,
                subject=e.email.subject,
                preheader=e.email.preheader,
                send_at_ms=e.send_time.send_at_ms,
                idempotency_key=e.idempotency_key,
                snapshot=dict(e.email.snapshot),
            )
            for e in result.emails
        ],
    )


@router.get("/segments", tags=["segments"])
async def get_segments(service: ServiceDep) -> SegmentsResponse:
    """Every segment rule with its live size (refreshed every ``population_ttl_s``)."""
    population, sizes = await run_in_threadpool(service.segment_sizes)
    return SegmentsResponse(
        at_ms=population.at_ms,
        customers=population.customers,
        segments=[
            SegmentSize(name=r.name, title=r.title, description=r.description, size=n)
            for r, n in sizes
        ],
    )


class NoStoreMiddleware:
    """Gives every answer ``Cache-Control: no-store`` unless it names its own: profiles,
    recommendations and renders carry personal data (addresses, names), and the API key travels
    in ``X-API-Key``, which HTTP caches do not treat as ``Authorization`` (RFC 9111 3.5), so a
    shared cache or proxy in front of the API could otherwise keep and replay them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(name.lower() == b"cache-control" for name, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_no_store)


class BodyLimitMiddleware:
    """Refuses (413, in the API's error shape) a request body over ``max_bytes`` before any of
    it is parsed: FastAPI reads and parses a body before the route's authentication runs, so
    without a limit anyone could make the API parse megabytes. Bodies here are small requests
    (a campaign render), so the body is read here and handed on whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        handed = False

        async def replay() -> Message:
            nonlocal handed
            if handed:
                return await receive()
            handed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"the request body is over the {self.max_bytes}-byte limit"
        await _error(413, "payload_too_large", detail)(scope, receive, send)


class _UnknownSegment(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AuthenticationFailed)
    async def _unauthorized(request: Request, exc: AuthenticationFailed) -> JSONResponse:
        response = _error(401, exc.code, exc.detail)
        response.headers["WWW-Authenticate"] = exc.challenge
        return response

    @app.exception_handler(ProfileNotFoundError)
    async def _not_found(request: Request, exc: ProfileNotFoundError) -> JSONResponse:
        return _error(404, "customer_not_found", str(exc))

    @app.exception_handler(_UnknownSegment)
    async def _no_segment(request: Request, exc: _UnknownSegment) -> JSONResponse:
        return _error(404, "segment_not_found", f"no segment named {exc.name!r}")

    @app.exception_handler(StoreError)
    async def _store(request: Request, exc: StoreError) -> JSONResponse:
        log.warning("profile store unavailable: %s", exc)
        return _error(503, "store_unavailable", "the profile store is not available yet")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        return _error(422, "validation_error", where, errors=jsonable_encoder(errors))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        """A bug: a JSON 500 that names nothing internal, never the server's text page. The
        server logs the traceback (the error is raised on); here only the route's template,
        as a path can carry a customer id."""
        route = getattr(request.scope.get("route"), "path", "?")
        log.error("unexpected %s on %s %s", type(exc).__name__, request.method, route)
        return _error(500, "internal_error", "the API failed to answer; retry later")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        response = _error(exc.status_code, code, str(exc.detail))
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response


def create_app(
    settings: Settings,
    warehouse_path: Path | None = None,
    *,
    clock_ms: Callable[[], int] = wall_clock_ms,
) -> FastAPI:
    """The API over the warehouse at ``warehouse_path`` (default: the settings' warehouse)."""
    service = PersonalizationService(settings, warehouse_path, clock_ms=clock_ms)

    follower: StoreFollower | None = None
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal follower
        if settings.api.follow_topics:
            follower = await run_in_threadpool(follow_topics, settings, service.warehouse_path)
            # caches built from a copy still being filled would be served for their whole TTL
            if not await run_in_threadpool(follower.caught_up.wait, _CATCH_UP_WAIT_S):
                log.warning("serving before the copy caught up with the topics")
        if service.warehouse_ready():
            # Build the shared signals before the first request, not during it.
            try:
                await run_in_threadpool(service.signals.get)
                await run_in_threadpool(service.population.get)
            except StoreError as exc:
                log.warning("could not warm the API caches: %s", exc)
        # caches built: from here on a request allocates short-lived objects (pipeline.gc_pauses)
        with tuned_and_counted(metrics.gc, settings.gc_young_threshold):
            yield
        service.close()
        if follower is not None:
            await run_in_threadpool(follower.close)

    app = FastAPI(
        title="Email personalization API",
        version="1",
        description="Profiles, recommendations with reasons, send times and rendered emails, "
        "served from the pipeline's profile store.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.authenticator = Authenticator(settings.api.api_keys, settings.api.jwt)
    _install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.api.max_body_bytes)
    app.add_middleware(NoStoreMiddleware)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)

    @app.get("/health", tags=["health"])
    async def health() -> HealthResponse:
        """Liveness, whether the profile store exists and, for an API keeping its own copy,
        how far that got; needs no credentials."""
        following = None
        if follower is not None:
            following = FollowStatus(
                applied=follower.applied,
                dropped=follower.dropped,
                retries=follower.retries,
                last_applied_ms=follower.last_applied_ms,
                caught_up=follower.caught_up.is_set(),
            )
        return HealthResponse(status="ok", warehouse=service.warehouse_ready(), following=following)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        """Requests by route and status, and their latency, in the Prometheus text format."""
        return metrics_response(metrics.registry)

    app.include_router(router)
    return app
