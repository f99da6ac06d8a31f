"""What is sent for one email: the payload, its deterministic idempotency key, and outcomes."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pipeline.emails import RenderedEmail


def idempotency_key(campaign_id: str, customer_id: str, occurrence: str = "") -> str:
    """``campaign + customer`` (+ ``occurrence``) hashed: one email per customer per campaign.

    A retry or a re-render reuses the key, so the platform sends once even when the profile
    has changed in between (a campaign rendered again after new events must not reach its
    members twice). A campaign that fires more than once per customer (a trigger) names the
    occurrence: each cart abandonment is its own email, each retry of it the same one.
    """
    material = "\x1f".join((campaign_id, customer_id, occurrence)).encode("utf-8")
    return "pl-" + hashlib.sha256(material).hexdigest()[:40]


@dataclass(frozen=True, slots=True)
class EmailPayload:
    """The JSON body sent to the email platform for one email."""

    to: str
    subject: str
    html: str
    text: str
    campaign: str
    customer: str
    idempotency_key: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def payload_for(email: RenderedEmail, to: str, occurrence: str = "") -> EmailPayload:
    """The payload of a rendered email, keyed by its campaign, customer and occurrence."""
    return EmailPayload(
        to=to,
        subject=email.subject,
        html=email.html,
        text=email.text,
        campaign=email.campaign_id,
        customer=email.customer_id,
        idempotency_key=idempotency_key(email.campaign_id, email.customer_id, occurrence),
    )


@dataclass(frozen=True, slots=True)
class Delivered:
    """The platform accepted the email (2xx); ``message_id`` if it returned one."""

    idempotency_key: str
    customer: str
    campaign: str
    status: int
    attempts: int
    message_id: str | None
    delivered_ms: int


FailureReason = Literal[
    "rejected", "unauthorized", "token_rejected", "retries_exhausted", "invalid_response"
]


@dataclass(frozen=True, slots=True)
class DeliveryFailure:
    """A send that will not succeed by retrying: a dead-letter record (JSON-safe via to_dict).

    ``reason``: ``rejected`` (a permanent 4xx), ``unauthorized`` (401 even with a fresh token),
    ``token_rejected`` (the token endpoint refused the client credentials),
    ``retries_exhausted`` (429/5xx/timeouts until ``max_attempts``), ``invalid_response``.
    The payload is kept, so the email can be re-driven from the dead-letter topic, but not its
    address: a re-drive looks that up again (consent may be withdrawn by then), and ``pipeline
    forget`` cannot reach a topic's records (the content goes with the topic's retention).
    """

    reason: FailureReason
    detail: str
    status: int | None
    attempts: int
    idempotency_key: str
    customer: str
    campaign: str
    failed_ms: int
    payload: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DeliveryOutcome = Delivered | DeliveryFailure
