"""How a simulated customer responds to one email: open, click, buy. Pure and seeded.

The case study measures the pipeline against this model, so it is stated here in full.

**Opening** depends on when the email lands. Let ``h`` be the local hour of the send instant in
the customer's time zone and ``d`` the hours from ``h`` forward to the customer's next active
hour (``d = 0`` when ``h`` is one of them): an email that lands outside the customer's hours
waits, buried under newer mail, until they next look. Then::

    m_hour  = 2 ** (-d / hour_half_life_hours)
    P(open) = base_open_rate * (1 - hour_sensitivity * (1 - m_hour))

so ``base_open_rate`` is the open rate of an email sent in an active hour, and
``hour_sensitivity`` (0..1) is the share of it lost when the email lands as far from the
customer's hours as possible (0: the send hour does not matter).

**Clicking** depends on how well the shown products match the customer's hidden tastes. Each
product ``i`` scores::

    q_i = (w_category * [category among the true top_categories categories]
           + w_brand * [brand among the true brands]
           + w_price * [price band == the true price band]) / (w_category + w_brand + w_price)
    a_i = 1 - preference_sensitivity * (1 - q_i)

(``[x]`` is 1 when ``x`` holds, else 0; the price band is the lower, middle or upper third of
prices in the product's category.) An opened email is clicked with::

    P(click | open) = base_click_rate * mean_i a_i

and the clicked product ``j`` is drawn with probability ``a_j / sum_i a_i``.

**Buying** depends on the clicked product alone::

    P(convert | click on j) = base_conversion_rate * a_j

``preference_sensitivity`` (0..1) is the share of clicks and purchases lost on a product that
matches nothing (0: every product is as good as any other). One ``random.Random`` draws, in
order, the open, the click, the clicked product and the purchase, so a seed fixes the response.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field

from pipeline.catalog import Catalog, Product
from pipeline.simulate.model import PriceBand, TrueCustomer
from pipeline.simulate.population import price_bands

HOURS_PER_DAY = 24


class BehaviourParams(BaseModel):
    """Every parameter of the response model (see the module formulas)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_open_rate: float = Field(0.35, ge=0, le=1, description="P(open) in an active hour")
    hour_sensitivity: float = Field(0.6, ge=0, le=1, description="opens lost at the worst hour")
    hour_half_life_hours: float = Field(3.0, gt=0, description="hours away that halve m_hour")
    base_click_rate: float = Field(0.2, ge=0, le=1, description="P(click | open), all matching")
    preference_sensitivity: float = Field(
        0.6, ge=0, le=1, description="clicks and purchases lost on a product matching nothing"
    )
    base_conversion_rate: float = Field(0.15, ge=0, le=1, description="P(buy | click), matching")
    top_categories: int = Field(3, ge=1, description="true top categories that count as a match")
    weight_category: float = Field(0.5, ge=0)
    weight_brand: float = Field(0.25, ge=0)
    weight_price: float = Field(0.25, ge=0)


@dataclass(frozen=True, slots=True)
class Response:
    """What the customer did with one email; ``clicked_product`` is None without a click."""

    opened: bool
    clicked: bool
    converted: bool
    clicked_product: str | None


_BANDS: dict[int, tuple[Catalog, dict[str, PriceBand]]] = {}


def _bands(catalog: Catalog) -> dict[str, PriceBand]:
    """The simulator's price bands of ``catalog``, computed once per catalog object."""
    cached = _BANDS.get(id(catalog))
    if cached is None or cached[0] is not catalog:
        cached = (catalog, price_bands(catalog))
        _BANDS[id(catalog)] = cached
    return cached[1]


def hours_to_active(customer: TrueCustomer, send_at_ms: int) -> int:
    """``d``: hours from the send's local hour forward to the customer's next active hour."""
    hour = datetime.fromtimestamp(send_at_ms / 1000, ZoneInfo(customer.timezone)).hour
    if not customer.active_hours:
        return HOURS_PER_DAY - 1
    return min((a - hour) % HOURS_PER_DAY for a in customer.active_hours)


def open_probability(customer: TrueCustomer, send_at_ms: int, params: BehaviourParams) -> float:
    """``P(open)`` of an email sent at ``send_at_ms`` (module formula)."""
    m_hour = math.exp2(-hours_to_active(customer, send_at_ms) / params.hour_half_life_hours)
    return params.base_open_rate * (1.0 - params.hour_sensitivity * (1.0 - m_hour))


def true_top_categories(category_prefs: Mapping[str, float], n: int) -> frozenset[str]:
    """The ``n`` categories with the largest true preference weight (ties by name)."""
    return frozenset(sorted(category_prefs, key=lambda c: (-category_prefs[c], c))[:n])


def match_score(
    product: Product,
    customer: TrueCustomer,
    band: PriceBand,
    params: BehaviourParams,
    *,
    top: frozenset[str] | None = None,
) -> float:
    """``q``: how well ``product`` (in price ``band``) fits the hidden tastes, 0..1."""
    if top is None:
        top = true_top_categories(customer.category_prefs, params.top_categories)
    total = params.weight_category + params.weight_brand + params.weight_price
    if total <= 0:
        return 1.0
    hit = (
        params.weight_category * (product.category in top)
        + params.weight_brand * (product.brand in customer.brand_prefs)
        + params.weight_price * (band == customer.price_band)
    )
    return hit / total


def attractiveness(
    customer: TrueCustomer, product_ids: Sequence[str], catalog: Catalog, params: BehaviourParams
) -> list[float]:
    """``a_i = 1 - preference_sensitivity * (1 - q_i)`` of each shown product."""
    bands = _bands(catalog)
    top = true_top_categories(customer.category_prefs, params.top_categories)
    s = params.preference_sensitivity
    return [
        1.0 - s * (1.0 - match_score(catalog[pid], customer, bands[pid], params, top=top))
        for pid in product_ids
    ]


def respond(
    customer: TrueCustomer,
    send_at_ms: int,
    product_ids: Sequence[str],
    catalog: Catalog,
    params: BehaviourParams,
    rng: random.Random,
) -> Response:
    """Draw the customer's response to an email showing ``product_ids`` sent at ``send_at_ms``."""
    if rng.random() >= open_probability(customer, send_at_ms, params):
        return Response(opened=False, clicked=False, converted=False, clicked_product=None)
    appeal = attractiveness(customer, product_ids, catalog, params)
    click_p = params.base_click_rate * sum(appeal) / len(appeal) if appeal else 0.0
    if rng.random() >= click_p:
        return Response(opened=True, clicked=False, converted=False, clicked_product=None)
    j = rng.choices(range(len(appeal)), weights=appeal)[0]
    converted = rng.random() < params.base_conversion_rate * appeal[j]
    return Response(opened=True, clicked=True, converted=converted, clicked_product=product_ids[j])
