"""Request and response bodies of the API (they make up its OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    """Every error: a stable machine code and a sentence for people."""

    error: str = Field(examples=["not_found"])
    detail: str
    errors: list[dict[str, Any]] | None = Field(
        None, description="Validation errors (422 only): location, message and type of each."
    )


class Score(BaseModel):
    """The Customer Interaction Score now (0..100) and its components (0..1)."""

    score: float
    recency: float
    frequency: float
    monetary: float


class CustomerResponse(BaseModel):
    customer_id: str
    requested_id: str
    at_ms: int
    score: Score
    intent_stage: str
    segments: list[str]
    profile: dict[str, Any] = Field(description="The stored profile, as the processor wrote it.")


class RecommendedItem(BaseModel):
    product_id: str
    name: str
    brand: str
    category: str
    price: float
    currency: str
    score: float
    reason: str
    source: str


class RecommendationsResponse(BaseModel):
    customer_id: str
    at_ms: int
    k: int
    cold_start: bool = Field(description="True when only popularity could be used.")
    items: list[RecommendedItem]


class SendTimeResponse(BaseModel):
    customer_id: str
    send_at: datetime
    send_at_ms: int
    local_time: datetime
    timezone: str
    hour_of_week: int
    confidence: float = Field(description="N / (N + alpha): share from the customer's own data.")
    probability: float
    observations: float
    fallback: bool = Field(description="True when no own data: the population prior decided.")


class RenderRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    segment: str = Field(min_length=1, max_length=64, examples=["cart_abandoners"])
    limit: int = Field(100, ge=1, description="Most emails rendered (capped by the server).")


class RenderedCampaignEmail(BaseModel):
    customer_id: str
    to: str | None
    subject: str
    preheader: str
    send_at_ms: int
    idempotency_key: str | None = Field(
        description="One per (campaign, customer); null for a triggered campaign, whose "
        "emails are keyed per trigger occurrence when they are sent."
    )
    snapshot: dict[str, Any]


class RenderResponse(BaseModel):
    campaign_id: str
    segment: str
    at_ms: int
    members: int = Field(description="Members of the segment in the latest population snapshot.")
    rendered: int
    emails: list[RenderedCampaignEmail]


class SegmentSize(BaseModel):
    name: str
    title: str
    description: str
    size: int


class SegmentsResponse(BaseModel):
    at_ms: int = Field(description="When the sizes were computed (refreshed periodically).")
    customers: int = Field(description="Known (identified) customers evaluated.")
    segments: list[SegmentSize]


class FollowStatus(BaseModel):
    """A serving replica's progress (``api.follow_topics``)."""

    applied: int
    dropped: int = Field(description="Records not applied: undecodable, malformed, forgotten.")
    retries: int = Field(
        description="Reads or writes tried again: rising while nothing is applied, the broker "
        "or the replica's disk is failing (records wait; none is dropped for it)."
    )
    last_applied_ms: int | None
    caught_up: bool


class HealthResponse(BaseModel):
    status: str
    warehouse: bool
    following: FollowStatus | None = None
