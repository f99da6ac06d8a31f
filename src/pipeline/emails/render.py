"""Render one personalized email from a profile, its recommendations and its send time.

Every value reaches the HTML part through Jinja2 autoescaping; every value is also flattened
to one line (control characters and line breaks become spaces), so a name cannot forge a
header line in the subject or extra lines in the plain-text part.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import quote, urlsplit

from jinja2 import Environment, PackageLoader, StrictUndefined
from pydantic import BaseModel, ConfigDict, Field

from pipeline.catalog import Catalog
from pipeline.recommend import Recommendation
from pipeline.scoring import (
    Profile,
    ScoringParams,
    affinity_shares,
    intent_stage,
    interaction_score,
)
from pipeline.sendtime import SendTime

CURRENCY_SYMBOLS: Mapping[str, str] = {"EUR": "\u20ac", "GBP": "\u00a3", "USD": "$"}
_SAFE_SCHEMES = frozenset({"http", "https", "mailto"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
# Bidi embeddings, overrides and isolates hold until their terminator or the end of the line,
# so one in a name could reverse the rest of the subject ("Trojan Source" spoofing): dropped.
_BIDI_CONTROL = re.compile(r"[\u202a-\u202e\u2066-\u2069]+")
# A longer first name (the identify schema allows 500 characters) is left out of the subject,
# which inbox lists cut at 40-70 characters anyway; the greeting still uses it.
SUBJECT_NAME_MAX = 40


class EmailParams(BaseModel):
    """Shop identity and copy limits of the rendered email."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shop_name: str = "Shop"
    shop_url: str = "https://shop.example.com"
    accent_colour: str = Field("#1f2937", pattern=r"^#[0-9a-fA-F]{6}$")
    snapshot_affinities: int = Field(5, ge=0, description="top affinities kept in the snapshot")
    utm_source: str = "email"


@dataclass(frozen=True, slots=True)
class RenderedEmail:
    """A ready-to-send email and the as-of snapshot of what produced it (JSON-safe)."""

    customer_id: str
    campaign_id: str
    subject: str
    preheader: str
    html: str
    text: str
    snapshot: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class _Item:
    """What a template shows of one recommended product."""

    product_id: str
    name: str
    brand: str
    category: str
    price: str
    reason: str
    url: str


@lru_cache(maxsize=1)
def _environment() -> Environment:
    """The template environment: HTML templates autoescaped, undefined names an error."""
    return Environment(
        loader=PackageLoader("pipeline.emails", "templates"),
        autoescape=lambda name: name is not None and name.endswith(".html.j2"),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def one_line(value: object) -> str:
    """``value`` as text on one line: control characters and line breaks become one space,
    bidi embedding, override and isolate controls are dropped."""
    return _CONTROL.sub(" ", _BIDI_CONTROL.sub("", str(value))).strip()


def _checked_url(url: str, what: str) -> str:
    """``url`` if it is absolute http(s) or mailto; anything else (``javascript:``) is refused,
    as is any whitespace or control character (which ``urlsplit`` silently drops, so the URL
    checked would not be the one rendered)."""
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError(f"{what} must not contain whitespace or control characters: {url!r}")
    parts = urlsplit(url)
    if parts.scheme.lower() not in _SAFE_SCHEMES or (parts.scheme != "mailto" and not parts.netloc):
        raise ValueError(f"{what} must be an absolute http(s) or mailto URL, got {url!r}")
    return url


def _price(amount: float, currency: str) -> str:
    symbol = CURRENCY_SYMBOLS.get(currency)
    return f"{symbol}{amount:,.2f}" if symbol else one_line(f"{amount:,.2f} {currency}")


def first_name(profile: Profile) -> str | None:
    """The customer's first name from identify traits (``firstName``, else ``first_name``: a
    null or empty one does not hide the other), or None."""
    for key in ("firstName", "first_name"):
        value = profile.traits.get(key)
        if isinstance(value, str) and (name := one_line(value)):
            return name
    return None


def _items(
    recommendations: Sequence[Recommendation],
    catalog: Catalog,
    params: EmailParams,
    campaign_id: str,
) -> list[_Item]:
    items = []
    tracking = f"utm_source={quote(params.utm_source)}&utm_campaign={quote(campaign_id)}"
    shop_url = params.shop_url.rstrip("/")  # "https://shop.example.com/" + "/p/..." is "//p/"
    for rec in recommendations:
        product = catalog.get(rec.product_id)
        if product is None:
            continue
        items.append(
            _Item(
                product_id=product.product_id,
                name=one_line(product.name),
                brand=one_line(product.brand),
                category=one_line(product.category.title()),
                price=_price(product.price, product.currency),
                reason=one_line(rec.reason),
                url=f"{shop_url}/p/{quote(product.product_id)}?{tracking}",
            )
        )
    return items


def _subject(name: str | None, items: Sequence[_Item]) -> str:
    categories = list(dict.fromkeys(item.category for item in items))
    if not items:
        topic = "New arrivals picked for you"
    elif len(categories) == 1:
        topic = f"New {categories[0].lower()} picked for you"
    else:
        topic = (
            f"{len(items)} picks for you, from {categories[0].lower()} to {categories[1].lower()}"
        )
    if not name or len(name) > SUBJECT_NAME_MAX:
        return topic
    return f"{name}, {topic[0].lower()}{topic[1:]}"


def _preheader(items: Sequence[_Item]) -> str:
    if not items:
        return "Fresh finds from the shop this week."
    first = items[0].reason.rstrip(".")
    more = len(items) - 1
    if not more:
        return f"{first}."
    return f"{first}. And {more} more {'pick' if more == 1 else 'picks'} inside."


def _snapshot(
    profile: Profile,
    recommendations: Sequence[Recommendation],
    send_time: SendTime,
    *,
    campaign_id: str,
    as_of_ms: int,
    segments: Iterable[str],
    parameters: Mapping[str, Any],
    params: EmailParams,
    scoring: ScoringParams,
) -> dict[str, Any]:
    """The profile fields, segments, parameters and reasons that produced the email: the score
    and intent stage as of ``as_of_ms``, like the segments (not as stored at the last event)."""
    top = params.snapshot_affinities
    return {
        "customer_id": profile.customer_id,
        "campaign_id": campaign_id,
        "as_of_ms": as_of_ms,
        "profile": {
            "version": profile.version,
            "first_name": first_name(profile),
            "timezone": profile.timezone,
            "cis": interaction_score(profile, as_of_ms, scoring).score,
            "intent_stage": intent_stage(profile, as_of_ms, scoring),
            "last_seen_ms": profile.last_seen_ms,
            "order_count": profile.order_count,
            "revenue_total": profile.revenue_total,
            "category_shares": dict(list(affinity_shares(profile.category_affinity).items())[:top]),
            "brand_shares": dict(list(affinity_shares(profile.brand_affinity).items())[:top]),
            "recent_views": list(profile.recent_views),
            "cart": dict(profile.cart),
            "purchased": list(profile.purchased),
        },
        "segments": sorted(segments),
        "send_time": asdict(send_time),
        "recommendations": [asdict(r) for r in recommendations],
        "parameters": {"email": params.model_dump(), **parameters},
    }


def render_email(
    profile: Profile,
    recommendations: Sequence[Recommendation],
    send_time: SendTime,
    catalog: Catalog,
    *,
    campaign_id: str,
    unsubscribe_url: str,
    as_of_ms: int,
    segments: Iterable[str] = (),
    parameters: Mapping[str, Any] | None = None,
    params: EmailParams | None = None,
    scoring: ScoringParams | None = None,
) -> RenderedEmail:
    """The personalized email for ``profile``; ``parameters`` (e.g. recommender and send-time
    params as dicts) are recorded in the snapshot with ``segments``."""
    params = params or EmailParams()
    _checked_url(params.shop_url, "shop_url")
    _checked_url(unsubscribe_url, "unsubscribe_url")
    name = first_name(profile)
    items = _items(recommendations, catalog, params, campaign_id)
    subject = one_line(_subject(name, items))
    preheader = one_line(_preheader(items))
    context = {
        "subject": subject,
        "preheader": preheader,
        "greeting": f"Hi {name}," if name else "Hi there,",
        "items": items,
        "shop_name": one_line(params.shop_name),
        "shop_url": params.shop_url,
        "accent": params.accent_colour,
        "unsubscribe_url": unsubscribe_url,
    }
    env = _environment()
    return RenderedEmail(
        customer_id=profile.customer_id,
        campaign_id=campaign_id,
        subject=subject,
        preheader=preheader,
        html=env.get_template("recommendations.html.j2").render(context),
        text=env.get_template("recommendations.txt.j2").render(context),
        snapshot=_snapshot(
            profile,
            recommendations,
            send_time,
            campaign_id=campaign_id,
            as_of_ms=as_of_ms,
            segments=segments,
            parameters=parameters or {},
            params=params,
            scoring=scoring or ScoringParams(),
        ),
    )
