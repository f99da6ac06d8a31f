"""Email triggers: cart and browse abandonment, due in event time, from profile timestamps.

quixstreams has no timers, and a trigger must fire precisely when the customer sends nothing
more. So triggers are found by a scheduled scan of the profile store against the stream's
watermark (the newest event time seen, minus a grace period for late events): a profile whose
last add-to-cart is older than the abandonment delay, with no order since, is due. Each trigger
has a deterministic id (customer, kind, the event time that armed it), so a scan repeated after a
crash re-emits the same id and consumers drop it; a new add-to-cart arms a new trigger.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from pipeline.scoring import Profile

TriggerKind = Literal["cart_abandonment", "browse_abandonment"]
TRIGGER_KINDS: frozenset[str] = frozenset(get_args(TriggerKind))
MINUTE_MS = 60_000


class TriggerParams(BaseModel):
    """Delays after which silence counts as abandonment, and the allowance for late events."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cart_abandonment_minutes: float = Field(60.0, gt=0)
    browse_abandonment_minutes: float = Field(240.0, gt=0)
    grace_minutes: float = Field(5.0, ge=0)
    scan_interval_s: float = Field(5.0, gt=0)
    segment_tick_minutes: float = Field(
        5.0,
        gt=0,
        description="How far the stream's clock (the event-time watermark) moves between two "
        "re-evaluations of every customer's time-dependent segments by the scan.",
    )
    browse_views_kept: int = Field(5, ge=1)
    beside_processor: bool = Field(
        True,
        description="Run the trigger scan and email delivery beside the processor (`pipeline "
        "up`). False where the processor replicas each keep only their own partitions and "
        "`pipeline follow --triggers` runs them on a copy of every partition (Kubernetes).",
    )
    max_age_hours: float = Field(
        72.0,
        gt=0,
        description="How long after it fell due a trigger is still emailed: one older is not "
        "emitted (triggers switched on over an old store, a long outage), and its email, if "
        "it missed its send time, is dropped rather than planned for another day.",
    )


@dataclass(frozen=True, slots=True)
class Trigger:
    """One email to send because a customer stopped short of buying."""

    trigger_id: str
    customer_id: str
    trigger: TriggerKind
    due_ms: int
    context: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "trigger_id": self.trigger_id,
            "customer_id": self.customer_id,
            "trigger": self.trigger,
            "due_ms": self.due_ms,
            "context": self.context,
        }


def due_triggers(profile: Profile, watermark_ms: int, params: TriggerParams) -> list[Trigger]:
    """Triggers due for ``profile`` once the stream has reached ``watermark_ms`` (event time).

    Only identified, not-merged customers are emailable. Cart abandonment: items in the cart,
    no order after the last add, and ``cart_abandonment_minutes`` passed. Browse abandonment:
    products viewed after the last add-to-cart and the last order, no cart abandonment armed
    (one email, not two), and ``browse_abandonment_minutes`` passed with nothing added; the
    products named are the recently viewed ones not bought.
    """
    if profile.is_anonymous or profile.merged_into is not None:
        return []
    now = watermark_ms - int(params.grace_minutes * MINUTE_MS)
    out: list[Trigger] = []
    cart, order, view = profile.last_cart_ms, profile.last_order_ms, profile.last_view_ms
    cid = profile.customer_id
    cart_armed = cart is not None and bool(profile.cart) and (order is None or order < cart)
    if cart is not None and cart_armed:
        due = cart + int(params.cart_abandonment_minutes * MINUTE_MS)
        if due <= now:
            out.append(
                Trigger(
                    f"{cid}:cart_abandonment:{cart}",
                    cid,
                    "cart_abandonment",
                    due,
                    {"cart": dict(profile.cart)},
                )
            )
    browsed = view is not None and (cart is None or cart < view) and (order is None or order < view)
    # a cart left behind is the stronger reason: one email, not two at the same send time
    if view is not None and browsed and not cart_armed:
        due = view + int(params.browse_abandonment_minutes * MINUTE_MS)
        bought = set(profile.purchased)
        viewed = [p for p in profile.recent_views if p not in bought][: params.browse_views_kept]
        if due <= now and viewed:  # (only products already bought: nothing to remind of)
            out.append(
                Trigger(
                    f"{cid}:browse_abandonment:{view}",
                    cid,
                    "browse_abandonment",
                    due,
                    {"viewed": viewed},
                )
            )
    return out


def expired(trigger: Trigger, watermark_ms: int, params: TriggerParams) -> bool:
    """Whether ``trigger`` fell due more than ``max_age_hours`` before the stream's clock
    (``watermark_ms`` less the grace period, as in :func:`due_triggers`): a reminder of a cart
    left weeks ago is noise, and a privacy surprise."""
    now = watermark_ms - int(params.grace_minutes * MINUTE_MS)
    return now - trigger.due_ms > int(params.max_age_hours * 60 * MINUTE_MS)
