"""The simulator's email-response model: probabilities move the documented way, seeded draws."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from pipeline.catalog import Catalog, Product, load_catalog
from pipeline.simulate import TrueCustomer, price_bands
from pipeline.simulate.behaviour import (
    BehaviourParams,
    Response,
    attractiveness,
    hours_to_active,
    match_score,
    open_probability,
    respond,
)

PARIS = ZoneInfo("Europe/Paris")
PARAMS = BehaviourParams()


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="module")
def matching(catalog: Catalog) -> Product:
    """A mid-band dress: category, brand and price band all match :func:`customer`."""
    bands = price_bands(catalog)
    return next(
        p for p in catalog.values() if p.category == "dresses" and bands[p.product_id] == "mid"
    )


@pytest.fixture(scope="module")
def unmatched(catalog: Catalog, matching: Product) -> Product:
    """A high-band product of a category and brand the customer does not care for."""
    bands = price_bands(catalog)
    return next(
        p
        for p in catalog.values()
        if p.category in {"boots", "swimwear"}
        and p.brand != matching.brand
        and bands[p.product_id] == "high"
    )


def customer(brand: str, *, hours: tuple[int, ...] = (19, 20, 21)) -> TrueCustomer:
    return TrueCustomer(
        customer_id="cus_1",
        is_known=True,
        email="a@example.com",
        first_name="Ada",
        last_name="Lovelace",
        timezone="Europe/Paris",
        active_hours=hours,
        category_prefs={"dresses": 0.6, "tops": 0.25, "jeans": 0.1, "boots": 0.05},
        brand_prefs={brand: 1.0},
        price_band="mid",
        devices=(),
        activity=1.0,
    )


def paris_ms(hour: int) -> int:
    """A Wednesday in winter at ``hour``:00 Paris time (UTC+1)."""
    return int(datetime(2026, 1, 14, hour, tzinfo=PARIS).astimezone(UTC).timestamp() * 1000)


def test_hours_to_active_counts_forward_in_local_time_and_wraps_midnight(
    matching: Product,
) -> None:
    c = customer(matching.brand)
    assert hours_to_active(c, paris_ms(20)) == 0
    assert hours_to_active(c, paris_ms(16)) == 3
    assert hours_to_active(c, paris_ms(22)) == 21  # missed tonight: tomorrow evening
    assert hours_to_active(c, paris_ms(19) - 1) == 1  # 18:59 local is hour 18


def test_open_probability_follows_the_formula(matching: Product) -> None:
    c = customer(matching.brand)
    assert open_probability(c, paris_ms(20), PARAMS) == pytest.approx(PARAMS.base_open_rate)
    three_away = PARAMS.base_open_rate * (1 - PARAMS.hour_sensitivity * (1 - 2 ** (-3 / 3.0)))
    assert open_probability(c, paris_ms(16), PARAMS) == pytest.approx(three_away)
    assert open_probability(c, paris_ms(16), PARAMS) < open_probability(c, paris_ms(20), PARAMS)
    assert open_probability(c, paris_ms(3), PARAMS) < open_probability(c, paris_ms(16), PARAMS)


def test_without_hour_sensitivity_the_send_hour_does_not_matter(matching: Product) -> None:
    c = customer(matching.brand)
    flat = PARAMS.model_copy(update={"hour_sensitivity": 0.0})
    assert {open_probability(c, paris_ms(h), flat) for h in range(24)} == {flat.base_open_rate}


def test_match_score_weights_category_brand_and_price_band(
    catalog: Catalog, matching: Product, unmatched: Product
) -> None:
    c = customer(matching.brand)
    assert match_score(matching, c, "mid", PARAMS) == 1.0
    assert match_score(unmatched, c, "high", PARAMS) == 0.0
    assert match_score(matching, c, "low", PARAMS) == pytest.approx(0.75)  # wrong band only
    assert match_score(unmatched, c, "mid", PARAMS) == pytest.approx(0.25)  # right band only
    # boots are the customer's 4th category: outside the true top 3
    assert PARAMS.top_categories == 3


def test_attractiveness_is_one_minus_sensitivity_times_mismatch(
    catalog: Catalog, matching: Product, unmatched: Product
) -> None:
    c = customer(matching.brand)
    ids = [matching.product_id, unmatched.product_id]
    assert attractiveness(c, ids, catalog, PARAMS) == pytest.approx(
        [1.0, 1.0 - PARAMS.preference_sensitivity]
    )
    indifferent = PARAMS.model_copy(update={"preference_sensitivity": 0.0})
    assert attractiveness(c, ids, catalog, indifferent) == [1.0, 1.0]


def _rates(
    c: TrueCustomer, send_at_ms: int, ids: list[str], catalog: Catalog, n: int = 6000
) -> tuple[float, float, float]:
    responses = [
        respond(c, send_at_ms, ids, catalog, PARAMS, random.Random(f"t:{i}")) for i in range(n)
    ]
    return (
        sum(r.opened for r in responses) / n,
        sum(r.clicked for r in responses) / n,
        sum(r.converted for r in responses) / n,
    )


def _close(observed: float, expected: float, n: int = 6000) -> bool:
    return abs(observed - expected) <= 4 * math.sqrt(expected * (1 - expected) / n) + 1e-9


def test_sends_in_active_hours_are_opened_more(catalog: Catalog, matching: Product) -> None:
    c = customer(matching.brand)
    ids = [matching.product_id]
    active_open, _, _ = _rates(c, paris_ms(20), ids, catalog)
    night_open, _, _ = _rates(c, paris_ms(3), ids, catalog)
    assert active_open > night_open
    assert _close(active_open, open_probability(c, paris_ms(20), PARAMS))
    assert _close(night_open, open_probability(c, paris_ms(3), PARAMS))


def test_matching_products_are_clicked_and_bought_more(
    catalog: Catalog, matching: Product, unmatched: Product
) -> None:
    c = customer(matching.brand)
    at = paris_ms(20)
    _, good_clicks, good_buys = _rates(c, at, [matching.product_id], catalog)
    _, bad_clicks, bad_buys = _rates(c, at, [unmatched.product_id], catalog)
    assert good_clicks > bad_clicks
    assert good_buys > bad_buys
    p_open = PARAMS.base_open_rate
    assert _close(good_clicks, p_open * PARAMS.base_click_rate)
    weak = 1 - PARAMS.preference_sensitivity
    assert _close(bad_clicks, p_open * PARAMS.base_click_rate * weak)
    assert _close(good_buys, p_open * PARAMS.base_click_rate * PARAMS.base_conversion_rate)


def test_the_clicked_product_is_drawn_by_attractiveness(
    catalog: Catalog, matching: Product, unmatched: Product
) -> None:
    c = customer(matching.brand)
    ids = [matching.product_id, unmatched.product_id]
    eager = PARAMS.model_copy(update={"base_open_rate": 1.0, "base_click_rate": 1.0})
    drawn = [
        respond(c, paris_ms(20), ids, catalog, eager, random.Random(i)).clicked_product
        for i in range(4000)
    ]
    clicked = [pid for pid in drawn if pid is not None]
    assert set(clicked) <= set(ids)
    share = clicked.count(matching.product_id) / len(clicked)
    expected = 1.0 / (1.0 + (1.0 - eager.preference_sensitivity))
    assert abs(share - expected) < 0.04


def test_responses_are_deterministic_per_seed(catalog: Catalog, matching: Product) -> None:
    c = customer(matching.brand)
    ids = [p.product_id for p in list(catalog.values())[:6]]

    def draw(seed: int) -> list[Response]:
        rng = random.Random(seed)
        return [respond(c, paris_ms(20), ids, catalog, PARAMS, rng) for _ in range(300)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_an_unopened_email_is_never_clicked_and_no_products_no_click(
    catalog: Catalog, matching: Product
) -> None:
    c = customer(matching.brand)
    for i in range(500):
        r = respond(c, paris_ms(3), [matching.product_id], catalog, PARAMS, random.Random(i))
        assert r.opened or not (r.clicked or r.converted)
        assert r.clicked or (r.clicked_product is None and not r.converted)
    always = PARAMS.model_copy(update={"base_open_rate": 1.0, "base_click_rate": 1.0})
    empty = respond(c, paris_ms(20), [], catalog, always, random.Random(0))
    assert empty == Response(opened=True, clicked=False, converted=False, clicked_product=None)


def test_params_are_validated() -> None:
    with pytest.raises(ValidationError):
        BehaviourParams(hour_sensitivity=1.5)
    with pytest.raises(ValidationError):
        BehaviourParams(open_rate=0.3)  # type: ignore[call-arg]
