"""Unit tests of the recommender: co-occurrence, trending, exclusions, reasons and speed."""

from __future__ import annotations

import gc
import math
import random
import time
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.catalog import Catalog, Product, load_catalog
from pipeline.recommend import (
    CatalogIndex,
    CoOccurrence,
    RecommendationSignals,
    RecommendParams,
    Trending,
    popular_baseline,
    recommend,
    signals_from_events,
)
from pipeline.scoring import DAY_MS, HOUR_MS, Profile
from pipeline.testing import T0_MS, make_event

NOW = T0_MS + 30 * DAY_MS


def product(
    pid: str,
    category: str,
    brand: str,
    *,
    price: float = 50.0,
    stock: int = 10,
    material: str = "cotton",
) -> Product:
    return Product(
        pid,
        f"{material.title()} {category} {pid}",
        category,
        brand,
        "Black",
        material,
        price,
        "EUR",
        stock,
    )


CATALOG = Catalog(
    [
        product("D1", "dresses", "Linnea", material="linen", price=40.0),
        product("D2", "dresses", "Linnea", material="linen", price=60.0),
        product("D3", "dresses", "Nordlys", material="linen", price=80.0),
        product("D4", "dresses", "Nordlys", material="silk", price=90.0),
        product("D5", "dresses", "Kestrel", material="silk", price=99.0, stock=0),
        product("D6", "dresses", "Kestrel", material="cotton", price=45.0),
        product("T1", "tops", "Linnea", price=20.0),
        product("T2", "tops", "Urban Loop", price=25.0),
        product("T3", "tops", "Urban Loop", price=30.0),
        product("B1", "bags", "Hallberg", price=150.0),
        product("B2", "bags", "Hallberg", price=120.0),
        product("S1", "shoes", "Kestrel", price=70.0),
    ]
)


def shopper(**fields: object) -> Profile:
    values: dict[str, object] = {"customer_id": "c1", "is_anonymous": False}
    values.update(fields)
    return Profile(**values)  # type: ignore[arg-type]


def test_co_occurrence_is_a_cosine_of_counts() -> None:
    co = CoOccurrence(RecommendParams(co_purchase_weight=3.0))
    co.update(["A", "B", "C", "A"])  # a repeat view counts once per session
    co.update(["A", "B"])
    # c_AB = 2, n_A = n_B = 2 -> 2 / sqrt(4) = 1; c_AC = 1, n_C = 1 -> 1 / sqrt(2)
    [ab, ac] = co.neighbours("A", 5)
    assert (ab.product_id, ab.score, ab.co_purchases) == ("B", pytest.approx(1.0), 0.0)
    assert (ac.product_id, ac.score) == ("C", pytest.approx(1 / math.sqrt(2)))
    co.update_order(["A", "D"])
    # c_AD = 3 (one co-purchase), n_A = 2 + 3 = 5, n_D = 3 -> 3 / sqrt(15)
    d = next(n for n in co.neighbours("A", 5) if n.product_id == "D")
    assert d.score == pytest.approx(3 / math.sqrt(15))
    assert d.co_purchases == 1.0
    # c_AB = 2 is now over sqrt(5 * 2): the co-purchase ranks first.
    assert [n.product_id for n in co.neighbours("A", 5)] == ["D", "B", "C"]
    assert co.neighbours("A", 5)[1].score == pytest.approx(2 / math.sqrt(10))
    assert co.neighbours("A", 5, min_support=2.0) == co.neighbours("A", 2)[:2]
    assert co.neighbours("Z", 5) == []
    assert len(co) == 4


def test_co_occurrence_caps_long_sessions() -> None:
    co = CoOccurrence(RecommendParams(co_session_items=3))
    co.update(["A", "B", "C", "D"])  # only the latest three are paired
    assert co.neighbours("A", 5) == []
    assert {n.product_id for n in co.neighbours("D", 5)} == {"B", "C"}


def test_views_without_a_session_id_are_co_viewed_only_within_one_visit() -> None:
    """A server-side sender without session ids: weeks of one customer's views are not one
    session, a pause of more than 30 minutes starts the next."""

    def view(pid: str, ts: int) -> dict[str, object]:
        return make_event(
            "Product Viewed", ts, product_id=pid, session_id=None, customer_id="c1"
        ).to_dict()

    events = [view("A", T0_MS), view("B", T0_MS + 5 * 60_000), view("C", T0_MS + 3 * DAY_MS)]
    co = signals_from_events(events).co_occurrence
    assert [n.product_id for n in co.neighbours("A", 5)] == ["B"]
    assert co.neighbours("C", 5) == []


def test_trending_decays_with_its_half_life() -> None:
    trending = Trending(RecommendParams(trending_half_life_hours=1.0))
    trending.add("P1", T0_MS, 1.0, groups=["dresses"])
    trending.add("P2", T0_MS + HOUR_MS, 1.0)
    assert trending.score("P1", T0_MS + HOUR_MS) == pytest.approx(0.5)
    assert trending.score("P2", T0_MS + 2 * HOUR_MS) == pytest.approx(0.5)
    assert trending.ranked() == [("P2", 1.0), ("P1", pytest.approx(0.5))]
    assert trending.top(5, group="dresses") == ["P1"]
    assert trending.score("P2", T0_MS, group="dresses") == 0.0
    assert Trending().ranked() == []


def test_trending_survives_long_gaps_without_overflow() -> None:
    trending = Trending(RecommendParams(trending_half_life_hours=1.0))
    trending.add("P1", T0_MS, 1.0)
    trending.add("P2", T0_MS + 2000 * HOUR_MS, 1.0)  # past the rescale threshold
    trending.add("P2", T0_MS + 2001 * HOUR_MS, 1.0)
    assert trending.score("P2", T0_MS + 2001 * HOUR_MS) == pytest.approx(1.5)
    assert trending.score("P1", T0_MS + 2001 * HOUR_MS) == pytest.approx(0.0)
    assert trending.top(1) == ["P2"]


def test_catalog_index_price_bands_are_category_thirds() -> None:
    index = CatalogIndex(CATALOG)
    # dresses by price: D1 40, D6 45 | D2 60, D3 80 | D4 90, D5 99
    assert [index.band[p] for p in ("D1", "D6", "D2", "D3", "D4", "D5")] == [
        "low",
        "low",
        "mid",
        "mid",
        "high",
        "high",
    ]
    assert {p.product_id for p in index.by_brand["Hallberg"]} == {"B1", "B2"}


def test_affinity_recommendations_with_a_viewing_reason() -> None:
    profile = shopper(
        category_affinity={"dresses": 8.0, "tops": 2.0},
        brand_affinity={"Linnea": 5.0},
        recent_views=["D1", "D3"],
        purchased=["D2"],
        first_seen_ms=NOW - 3 * DAY_MS,  # every view of theirs is from this week
        last_view_ms=NOW - DAY_MS,
    )
    recs = recommend(profile, CATALOG, k=4, signals=RecommendationSignals(), at_ms=NOW)
    ids = [r.product_id for r in recs]
    assert "D2" not in ids and "D5" not in ids  # bought, out of stock
    assert ids[0] == "D1"  # dresses 0.8 + brand 0.6 * 1.0, viewed, and in the viewed low band
    assert recs[0].source == "affinity"
    assert recs[0].reason == "Because you viewed 2 linen dresses this week"
    assert len(ids) == len(set(ids)) == 4
    assert all(r.score > 0 for r in recs)
    # seen for months, the newest view yesterday: the views counted may be old, so no "week"
    profile.first_seen_ms = NOW - 90 * DAY_MS
    recs = recommend(profile, CATALOG, k=4, signals=RecommendationSignals(), at_ms=NOW)
    assert recs[0].reason == "Because you viewed 2 linen dresses recently"


def test_recently_viewed_reason_without_affinity() -> None:
    profile = shopper(recent_views=["B1"], last_view_ms=NOW - 10 * DAY_MS)
    [rec, *_] = recommend(profile, CATALOG, k=3, signals=RecommendationSignals(), at_ms=NOW)
    assert (rec.product_id, rec.source, rec.reason) == (
        "B1",
        "recently_viewed",
        "You viewed this recently",
    )


def test_co_occurrence_reason_names_the_seed() -> None:
    signals = RecommendationSignals()
    for _ in range(3):
        signals.co_occurrence.update_order(["S1", "B2"])
    profile = shopper(purchased=["S1"])
    recs = recommend(
        profile, CATALOG, k=3, signals=signals, at_ms=NOW, params=RecommendParams(seeds=1)
    )
    assert recs[0].product_id == "B2"
    assert recs[0].source == "co_occurrence"
    assert recs[0].reason == f"Often bought with {CATALOG['S1'].name}"


def test_co_occurrence_reason_names_the_seed_that_contributed_most() -> None:
    signals = RecommendationSignals()
    co = signals.co_occurrence
    co.update(["T1", "B1"])  # B1 is a weak neighbour of the cart item T1 (sim 1/6) ...
    for _ in range(5):
        co.update(["T1", "T2"])
        co.update(["S1", "B1"])  # ... and a strong one of the viewed S1 (sim 0.91)
    profile = shopper(cart={"T1": 1}, recent_views=["S1"])
    params = RecommendParams(weight_recent=0.0)
    recs = recommend(profile, CATALOG, k=3, signals=signals, params=params, at_ms=NOW)
    [b1] = [r for r in recs if r.product_id == "B1"]
    assert b1.source == "co_occurrence"
    assert b1.reason == f"Often viewed with {CATALOG['S1'].name}"  # was the cart item T1's


def test_trending_in_a_favourite_category() -> None:
    signals = RecommendationSignals()
    signals.trending.add("T3", NOW, 5.0, groups=["tops"])
    profile = shopper(category_affinity={"tops": 1.0})
    params = RecommendParams(weight_affinity=0.0)
    [rec] = recommend(profile, CATALOG, k=1, signals=signals, params=params, at_ms=NOW)
    assert (rec.product_id, rec.source, rec.reason) == (
        "T3",
        "trending",
        "Popular in Tops right now",
    )


def test_cold_start_gets_popular_items() -> None:
    signals = RecommendationSignals()
    signals.trending.add("B2", NOW, 3.0)
    signals.trending.add("D5", NOW, 9.0)  # out of stock
    signals.trending.add("T1", NOW, 1.0)
    recs = recommend(shopper(), CATALOG, k=3, signals=signals, at_ms=NOW)
    assert [r.product_id for r in recs][:2] == ["B2", "T1"]
    assert {r.source for r in recs} == {"popular"}
    assert recs[0].reason == "Popular right now"
    assert len(recs) == 3  # topped up from the catalog when little is trending
    assert recs[2].score == 0.0
    assert recs[2].reason == "From our current collection"  # not trending: not "popular"


def test_nothing_trending_is_not_called_popular() -> None:
    recs = popular_baseline(CATALOG, signals=RecommendationSignals(), k=3)
    assert len(recs) == 3
    assert {r.reason for r in recs} == {"From our current collection"}
    recs = popular_baseline(CATALOG, signals=RecommendationSignals(), k=2, group="tops")
    assert [r.reason for r in recs] == ["From our Tops collection"] * 2


def test_popular_in_a_group() -> None:
    signals = RecommendationSignals()
    signals.trending.add("T2", NOW, 1.0, groups=["tops"])
    recs = popular_baseline(CATALOG, signals=signals, k=2, group="tops")
    assert [r.product_id for r in recs] == ["T2", "T1"]
    assert recs[0].reason == "Popular in Tops right now"
    assert recs[1].reason == "From our Tops collection"  # topped up, not trending


def test_diversity_caps_products_per_category() -> None:
    profile = shopper(category_affinity={"dresses": 10.0, "tops": 0.1})
    params = RecommendParams(max_per_category=2)
    recs = recommend(
        profile, CATALOG, k=6, signals=RecommendationSignals(), params=params, at_ms=NOW
    )
    per_category = Counter(CATALOG[r.product_id].category for r in recs)
    assert max(per_category.values()) <= 2
    assert len(recs) == 6


def test_signals_from_clean_events() -> None:
    events = [
        make_event("Product Viewed", T0_MS, product_id="D1", category="dresses", session_id="s1"),
        make_event(
            "Product Viewed", T0_MS + 1, product_id="D2", category="dresses", session_id="s1"
        ),
        make_event("Product Viewed", T0_MS + 2, product_id="T1", category="tops", session_id="s2"),
    ]
    signals = signals_from_events(e.to_dict() for e in events)
    assert [n.product_id for n in signals.co_occurrence.neighbours("D1", 5)] == ["D2"]
    assert signals.co_occurrence.neighbours("T1", 5) == []
    assert set(signals.trending.top(5, group="dresses")) == {"D1", "D2"}


product_ids = st.sampled_from(sorted(CATALOG))


@settings(max_examples=200, deadline=None)
@given(
    views=st.lists(product_ids, max_size=15, unique=True),
    bought=st.lists(product_ids, max_size=8, unique=True),
    cart=st.lists(product_ids, max_size=3, unique=True),
    categories=st.dictionaries(
        st.sampled_from(["dresses", "tops", "bags", "shoes"]), st.floats(0.01, 100)
    ),
    brands=st.dictionaries(st.sampled_from(["Linnea", "Kestrel", "Hallberg"]), st.floats(0.01, 9)),
    sold_out=st.sets(product_ids, max_size=6),
    orders=st.lists(st.lists(product_ids, min_size=2, max_size=4), max_size=5),
    k=st.integers(1, 12),
)
def test_never_recommends_purchased_or_out_of_stock(
    views: list[str],
    bought: list[str],
    cart: list[str],
    categories: dict[str, float],
    brands: dict[str, float],
    sold_out: set[str],
    orders: list[list[str]],
    k: int,
) -> None:
    catalog = Catalog(
        Product(**{**_fields(p), "stock": 0}) if p.product_id in sold_out else p
        for p in CATALOG.values()
    )
    signals = RecommendationSignals()
    signals.co_occurrence.update(views)
    for basket in orders:
        signals.co_occurrence.update_order(basket)
    for i, pid in enumerate(views):
        signals.trending.add(pid, NOW - i * HOUR_MS, groups=[CATALOG[pid].category])
    profile = shopper(
        recent_views=views,
        purchased=bought,
        cart=dict.fromkeys(cart, 1),
        category_affinity=categories,
        brand_affinity=brands,
        last_view_ms=NOW,
    )
    recs = recommend(profile, catalog, k=k, signals=signals, at_ms=NOW)
    ids = [r.product_id for r in recs]
    assert not set(ids) & set(bought)
    assert all(catalog[pid].stock > 0 for pid in ids)
    assert len(ids) == len(set(ids)) <= k
    available = sum(1 for p in catalog.values() if p.stock > 0 and p.product_id not in bought)
    assert len(ids) == min(k, available)
    assert all(r.reason for r in recs)


def _fields(p: Product) -> dict[str, object]:
    return {name: getattr(p, name) for name in Product.__slots__}


def test_recommend_p99_under_5_ms_on_the_600_product_catalog() -> None:
    catalog = load_catalog()
    products = list(catalog.values())
    rng = random.Random(5)
    signals = RecommendationSignals()
    for _ in range(3000):
        session = [rng.choice(products).product_id for _ in range(rng.randint(1, 8))]
        signals.co_occurrence.update(session)
        for pid in session:
            signals.trending.add(
                pid, NOW - rng.randrange(7 * DAY_MS), groups=[catalog[pid].category]
            )
    profiles = []
    for i in range(200):
        picks = rng.sample(products, 40)
        profiles.append(
            shopper(
                customer_id=f"c{i}",
                recent_views=[p.product_id for p in picks[:20]],
                purchased=[p.product_id for p in picks[20:30]],
                cart={p.product_id: 1 for p in picks[30:33]},
                category_affinity={p.category: rng.random() * 10 for p in picks[:12]},
                brand_affinity={p.brand: rng.random() * 10 for p in picks[:12]},
                last_view_ms=NOW,
            )
        )
    recommend(profiles[0], catalog, k=10, signals=signals, at_ms=NOW)  # builds the index
    wall: list[float] = []
    cpu: list[float] = []
    gc.collect()
    for _ in range(5):
        for profile in profiles:
            start, start_cpu = time.perf_counter(), time.thread_time()
            recommend(profile, catalog, k=10, signals=signals, at_ms=NOW)
            cpu.append(time.thread_time() - start_cpu)
            wall.append(time.perf_counter() - start)
    # CPU time is asserted: wall time also counts other processes on a busy test machine.
    p50, p99 = _percentile(wall, 0.5), _percentile(wall, 0.99)
    cpu_p50, cpu_p99 = _percentile(cpu, 0.5), _percentile(cpu, 0.99)
    print(
        f"recommend() k=10, 600 products: wall p50 {p50:.2f} ms, p99 {p99:.2f} ms; "
        f"CPU p50 {cpu_p50:.2f} ms, p99 {cpu_p99:.2f} ms"
    )
    assert cpu_p99 <= 5.0


def _percentile(seconds: list[float], q: float) -> float:
    """The ``q`` quantile of ``seconds``, in milliseconds (nearest rank)."""
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


def test_recently_viewed_ranks_count_only_the_views_not_bought() -> None:
    """``w_recent / (1 + i)`` for the i-th most recent view *not bought*: a bought view
    before it does not halve its score."""
    scores = []
    for views in (["B2", "B1"], ["B1", "B2"]):
        profile = shopper(recent_views=views, purchased=["B2"], last_view_ms=NOW)
        recs = recommend(profile, CATALOG, k=3, signals=RecommendationSignals(), at_ms=NOW)
        [b1] = [r for r in recs if r.product_id == "B1"]
        assert b1.source == "recently_viewed"
        scores.append(b1.score)
    assert scores[0] == pytest.approx(scores[1])
