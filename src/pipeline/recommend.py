"""Product recommendations with a human-readable reason for each item; pure, in memory.

Candidates come from four sources, each adding to a product's score:

* ``affinity``: ``w_affinity * (share_c + w_brand * share_b)``, the decayed category and
  brand affinity shares of the profile (:func:`pipeline.scoring.affinity_shares`);
* ``recently_viewed``: ``w_recent / (1 + i)`` for the ``i``-th most recent view not bought;
* ``co_occurrence``: ``w_co * sim(seed, p)``, summed over seeds (recent views, cart, purchases),
  ``sim`` the cosine of co-view/co-purchase counts (:class:`CoOccurrence`);
* ``trending``: ``w_trend * share_c * pop_c(p) / max pop_c`` for the ``trending_per_category``
  most popular products of each of the customer's top categories (:class:`Trending`).

The sum is multiplied by the price-band fit ``(1 - w_price) + w_price * 3 * q_band(p)``, with
``q`` the customer's Laplace-smoothed share of viewed, carted and bought products per price
band (the lower/middle/upper third of prices in a category), so ``q = 1/3`` is neutral.
Items topped up from popularity carry source ``popular`` (reason "Popular right now", or "From
our current collection" for those topped up in catalog order because nothing of theirs is
trending); ``at_ms`` only words the reasons ("this week"), it never changes the ranking.
Purchased and out-of-stock products are never recommended. Selection is greedy and diverse:
each pick maximizes ``score * category_penalty ** n_c * brand_penalty ** n_b`` (``n`` the
products of that category/brand already picked), at most ``max_per_category`` per category.
Each item's reason and ``source`` come from the source that contributed most to its score; a
co-occurrence reason names the seed whose similarity contributed most.
A profile with no signal at all (cold start) gets :func:`popular_baseline`.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.catalog import Catalog, Product
from pipeline.scoring import DAY_MS, HOUR_MS, Profile, affinity_shares

Source = Literal["affinity", "recently_viewed", "co_occurrence", "trending", "popular"]
PriceBand = Literal["low", "mid", "high"]
PRICE_BANDS: tuple[PriceBand, ...] = ("low", "mid", "high")

VIEW_EVENTS = frozenset({"Product Viewed", "Product Clicked"})
CART_EVENT = "Product Added"
ORDER_EVENT = "Order Completed"


class RecommendParams(BaseModel):
    """Every weight and limit of the recommender (see the module formulas)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    weight_affinity: float = Field(1.0, ge=0)
    weight_brand: float = Field(0.6, ge=0, description="brand share relative to category share")
    weight_recent: float = Field(0.5, ge=0)
    weight_co_occurrence: float = Field(0.25, ge=0)
    weight_trending: float = Field(0.25, ge=0)
    weight_price_fit: float = Field(0.5, ge=0, le=1)
    top_categories: int = Field(4, ge=1)
    top_brands: int = Field(3, ge=0)
    recent_views_used: int = Field(10, ge=0)
    seeds: int = Field(
        5, ge=0, description="recent views/cart/purchases used as co-occurrence seeds"
    )
    neighbours_per_seed: int = Field(10, ge=0)
    max_per_category: int = Field(5, ge=1)
    category_penalty: float = Field(0.85, gt=0, le=1)
    brand_penalty: float = Field(0.9, gt=0, le=1)
    pool_size: int = Field(60, ge=1, description="best candidates considered for diversification")
    trending_per_category: int = Field(10, ge=0, description="trending items per top category")
    this_week_days: float = Field(7.0, gt=0, description="views this recent read 'this week'")
    trending_half_life_hours: float = Field(72.0, gt=0)
    co_purchase_weight: float = Field(3.0, ge=0, description="one co-purchase in co-views")
    co_session_items: int = Field(20, ge=2, description="latest items of a session paired")
    session_gap_minutes: float = Field(
        30.0,
        gt=0,
        description="views without a session id: a pause this long starts a new session",
    )
    co_min_support: float = Field(1.0, ge=0, description="least co-count for a neighbour")
    trend_weights: dict[str, float] = Field(
        default_factory=lambda: {
            "Product Viewed": 1.0,
            "Product Added": 3.0,
            "Order Completed": 5.0,
        }
    )


@dataclass(frozen=True, slots=True)
class Recommendation:
    """One recommended product, its score, why (for the customer) and which source found it."""

    product_id: str
    score: float
    reason: str
    source: Source


@dataclass(frozen=True, slots=True)
class Neighbour:
    """A product that co-occurs with another: cosine similarity and raw co-purchase count."""

    product_id: str
    score: float
    co_purchases: float


class CoOccurrence:
    """Item-to-item co-view and co-purchase counts, updated incrementally.

    ``sim(a, b) = c_ab / sqrt(n_a * n_b)`` with ``c_ab = co_views + co_purchase_weight *
    co_purchases`` and ``n_x`` the occurrences of ``x`` weighted the same way, so popular
    items do not neighbour everything.
    """

    def __init__(self, params: RecommendParams | None = None) -> None:
        params = params or RecommendParams()
        self._purchase_weight = params.co_purchase_weight
        self._session_items = params.co_session_items
        self._pairs: dict[str, dict[str, float]] = defaultdict(dict)
        self._purchases: dict[str, dict[str, float]] = defaultdict(dict)
        self._occurrences: dict[str, float] = defaultdict(float)
        # Neighbour lists per product and (k, min_support), cleared by any update.
        self._cache: dict[str, dict[tuple[int, float], list[Neighbour]]] = {}

    def __len__(self) -> int:
        return len(self._occurrences)

    def _add(self, items: Sequence[str], weight: float, purchase: bool) -> None:
        distinct = list(dict.fromkeys(items))[-self._session_items :]
        for pid in distinct:
            self._occurrences[pid] += weight
        # A cosine reads its neighbours' occurrence counts too, so any cached list that mentions
        # a touched product is stale; clearing all is simplest and batch reads still hit.
        self._cache.clear()
        for i, a in enumerate(distinct):
            row_a = self._pairs[a]
            for b in distinct[i + 1 :]:
                row_a[b] = row_a.get(b, 0.0) + weight
                row_b = self._pairs[b]
                row_b[a] = row_b.get(a, 0.0) + weight
                if purchase:
                    self._purchases[a][b] = self._purchases[a].get(b, 0.0) + 1.0
                    self._purchases[b][a] = self._purchases[b].get(a, 0.0) + 1.0

    def update(self, session_product_ids: Sequence[str]) -> None:
        """Count the products viewed in one session as co-viewed (each pair once)."""
        self._add(session_product_ids, 1.0, purchase=False)

    def update_order(self, product_ids: Sequence[str]) -> None:
        """Count the products of one order as bought together."""
        self._add(product_ids, self._purchase_weight, purchase=True)

    def neighbours(self, product_id: str, k: int, *, min_support: float = 0.0) -> list[Neighbour]:
        """The ``k`` most similar products to ``product_id``, best first (ties by id)."""
        row = self._pairs.get(product_id)
        if not row or k <= 0:
            return []
        cached = self._cache.get(product_id, {}).get((k, min_support))
        if cached is not None:
            return list(cached)
        n_a = self._occurrences[product_id]
        bought = self._purchases.get(product_id, {})
        occurrences = self._occurrences
        scored = [
            (c / math.sqrt(n_a * occurrences[b]), b) for b, c in row.items() if c >= min_support
        ]
        top = heapq.nsmallest(k, scored, key=lambda sb: (-sb[0], sb[1]))
        found = [Neighbour(b, score, bought.get(b, 0.0)) for score, b in top]
        self._cache.setdefault(product_id, {})[(k, min_support)] = found
        return list(found)


class Trending:
    """Popularity with exponential decay (half-life ``half_life_hours``), overall and per group.

    A weight ``w`` added at ``t`` counts ``w * 2 ** (-(at - t) / h)`` at time ``at``. Values are
    stored relative to a fixed reference time, so an update is O(1) and the ranking does not
    change with ``at``; the reference moves forward before the numbers grow too large.
    """

    _RESCALE_EXPONENT = 512.0

    def __init__(self, params: RecommendParams | None = None) -> None:
        params = params or RecommendParams()
        self._half_life_ms = params.trending_half_life_hours * HOUR_MS
        self._ref_ms: int | None = None
        self._scores: dict[str | None, dict[str, float]] = defaultdict(dict)
        self._ranked: dict[str | None, list[tuple[str, float]]] = {}

    def add(
        self, product_id: str, ts_ms: int, weight: float = 1.0, *, groups: Iterable[str] = ()
    ) -> None:
        """Count one interaction with ``product_id`` overall and in each of ``groups``."""
        if self._ref_ms is None:
            self._ref_ms = ts_ms
        exponent = (ts_ms - self._ref_ms) / self._half_life_ms
        if exponent > self._RESCALE_EXPONENT:
            factor = math.exp2(-exponent)
            for table in self._scores.values():
                for key in table:
                    table[key] *= factor
            self._ref_ms = ts_ms
            exponent = 0.0
        value = weight * math.exp2(exponent)
        for group in (None, *groups):
            table = self._scores[group]
            table[product_id] = table.get(product_id, 0.0) + value
            self._ranked.pop(group, None)

    def score(self, product_id: str, at_ms: int, *, group: str | None = None) -> float:
        """The decayed popularity of ``product_id`` at ``at_ms``."""
        table = self._scores.get(group)
        if not table or self._ref_ms is None:
            return 0.0
        return table.get(product_id, 0.0) * math.exp2(-(at_ms - self._ref_ms) / self._half_life_ms)

    def ranked(self, *, group: str | None = None) -> list[tuple[str, float]]:
        """Products of ``group`` by popularity, best first, with relative scores (best = 1)."""
        cached = self._ranked.get(group)
        if cached is None:
            table = self._scores.get(group) or {}
            top = max(table.values(), default=0.0)
            cached = sorted(
                ((pid, v / top) for pid, v in table.items() if top > 0),
                key=lambda kv: (-kv[1], kv[0]),
            )
            self._ranked[group] = cached
        return cached

    def top(self, k: int, *, group: str | None = None) -> list[str]:
        """The ``k`` most popular product ids of ``group``."""
        return [pid for pid, _ in self.ranked(group=group)[:k]]


@dataclass(slots=True)
class RecommendationSignals:
    """Shared, incrementally kept signals: co-occurrence and trending (one per process)."""

    co_occurrence: CoOccurrence = field(default_factory=CoOccurrence)
    trending: Trending = field(default_factory=Trending)


def signals_from_events(
    events: Iterable[Mapping[str, Any]], params: RecommendParams | None = None
) -> RecommendationSignals:
    """Build signals from clean event dicts (``CleanEvent.to_dict``) in one pass.

    Views are grouped into sessions by ``(customer_id, session_id)`` for co-views, and those
    without a session id (server-side senders) by a pause of ``session_gap_minutes``, the usual
    web-analytics rule: else weeks of one customer's views would count as co-viewed; each order
    is a co-purchase basket; views, adds and orders feed trending per product and category.
    """
    params = params or RecommendParams()
    signals = RecommendationSignals(CoOccurrence(params), Trending(params))
    sessions: dict[tuple[str | None, str | None], list[str]] = defaultdict(list)
    unsessioned: dict[str | None, list[tuple[int, str]]] = defaultdict(list)
    weights = params.trend_weights
    for event in events:
        name = event.get("name")
        ts = event.get("timestamp_ms")
        if not isinstance(name, str) or not isinstance(ts, int):
            continue
        pid = event.get("product_id")
        category = event.get("category")
        groups = (category,) if isinstance(category, str) else ()
        if name in VIEW_EVENTS and isinstance(pid, str):
            session = event.get("session_id")
            if session:
                sessions[(event.get("customer_id"), session)].append(pid)
            else:
                unsessioned[event.get("customer_id")].append((ts, pid))
        if name == ORDER_EVENT:
            items = event.get("items") or ()
            basket = [i["product_id"] for i in items]
            signals.co_occurrence.update_order(basket)
            for item in items:
                cat = item.get("category")
                signals.trending.add(
                    item["product_id"],
                    ts,
                    weights.get(name, 0.0),
                    groups=(cat,) if isinstance(cat, str) else (),
                )
        elif name in weights and isinstance(pid, str):
            signals.trending.add(pid, ts, weights[name], groups=groups)
    for viewed in sessions.values():
        signals.co_occurrence.update(viewed)
    gap_ms = params.session_gap_minutes * 60_000
    for views in unsessioned.values():
        for viewed in _split_by_pause(views, gap_ms):
            signals.co_occurrence.update(viewed)
    return signals


def _split_by_pause(views: list[tuple[int, str]], gap_ms: float) -> list[list[str]]:
    """Products viewed, ``(event time, product)``, cut into sessions where a pause between two
    views (in event time) exceeds ``gap_ms``."""
    out: list[list[str]] = []
    last: int | None = None
    for ts, pid in sorted(views, key=lambda v: v[0]):
        if last is None or ts - last > gap_ms:
            out.append([])
        out[-1].append(pid)
        last = ts
    return out


class CatalogIndex:
    """Per-category and per-brand product lists and price bands, computed once per catalog.

    A product's price band is the lower, middle or upper third of prices in its category.
    """

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.products: dict[str, Product] = dict(catalog.items())
        self.in_stock: tuple[Product, ...] = tuple(p for p in catalog.values() if p.stock > 0)
        self.out_of_stock: frozenset[str] = frozenset(
            p.product_id for p in catalog.values() if p.stock <= 0
        )
        self.by_category: dict[str, tuple[Product, ...]] = {}
        by_brand: dict[str, list[Product]] = defaultdict(list)
        self.band: dict[str, PriceBand] = {}
        for category, products in catalog.by_category().items():
            self.by_category[category] = tuple(products)
            ranked = sorted(products, key=lambda p: (p.price, p.product_id))
            for i, product in enumerate(ranked):
                self.band[product.product_id] = PRICE_BANDS[min(2, 3 * i // len(ranked))]
        for product in catalog.values():
            by_brand[product.brand].append(product)
        self.by_brand: dict[str, tuple[Product, ...]] = {b: tuple(ps) for b, ps in by_brand.items()}


_INDEXES: dict[int, CatalogIndex] = {}


def catalog_index(catalog: Catalog) -> CatalogIndex:
    """The (cached) index of ``catalog``; catalogs are immutable, so one per object."""
    index = _INDEXES.get(id(catalog))
    if index is None or index.catalog is not catalog:
        index = CatalogIndex(catalog)
        _INDEXES[id(catalog)] = index
    return index


def _price_fit(profile: Profile, index: CatalogIndex, weight: float) -> dict[PriceBand, float]:
    """Multiplier per band: ``(1 - w) + w * 3 * q_band``, ``q`` Laplace-smoothed band shares."""
    counts = dict.fromkeys(PRICE_BANDS, 1.0)
    for pid in (*profile.recent_views, *profile.cart, *profile.purchased):
        band = index.band.get(pid)
        if band is not None:
            counts[band] += 1.0
    total = sum(counts.values())
    scale = weight * len(PRICE_BANDS) / total
    return {b: (1.0 - weight) + scale * counts[b] for b in PRICE_BANDS}


def _period(profile: Profile, at_ms: int, params: RecommendParams) -> str:
    """ "this week" only when every view in the profile is that recent: the profile keeps no
    time per view, so a customer first seen this week is the one case it can say so."""
    first = profile.first_seen_ms
    if first is not None and at_ms - first <= params.this_week_days * DAY_MS:
        return "this week"
    return "recently"


def _affinity_reason(
    product: Product, viewed: Sequence[Product], period: str, brand_shares: Mapping[str, float]
) -> str:
    """'Because you viewed 3 linen dresses this week', or the brand/category it matches."""
    same_material = sum(
        1 for p in viewed if p.category == product.category and p.material == product.material
    )
    if same_material >= 2:
        return f"Because you viewed {same_material} {product.material} {product.category} {period}"
    same_category = sum(1 for p in viewed if p.category == product.category)
    if same_category >= 2:
        return f"Because you viewed {same_category} {product.category} {period}"
    if product.brand in brand_shares:
        return f"Because you like {product.brand}"
    return f"Picked from {product.category.title()}, a favourite of yours"


def recommend(
    profile: Profile,
    catalog: Catalog,
    *,
    k: int = 10,
    signals: RecommendationSignals,
    params: RecommendParams | None = None,
    at_ms: int,
) -> list[Recommendation]:
    """Up to ``k`` diverse products for ``profile``, each with a reason (see the module doc)."""
    params = params or RecommendParams()
    index = catalog_index(catalog)
    products = index.products
    excluded = set(profile.purchased)
    excluded |= index.out_of_stock
    sources: dict[Source, dict[str, float]] = {
        "affinity": {},
        "recently_viewed": {},
        "co_occurrence": {},
        "trending": {},
    }
    reasons: dict[tuple[str, Source], str] = {}

    cat_shares = affinity_shares(profile.category_affinity)
    brand_shares = dict(list(affinity_shares(profile.brand_affinity).items())[: params.top_brands])
    top_cats = list(cat_shares)[: params.top_categories]
    viewed = [products[pid] for pid in profile.recent_views if pid in products]
    period = _period(profile, at_ms, params)

    # Affinity reasons are worded only for the products picked: most candidates are not.
    affinity = sources["affinity"]
    w_cat = params.weight_affinity
    w_brand = params.weight_affinity * params.weight_brand
    for category in top_cats:
        value = w_cat * cat_shares[category]
        for product in index.by_category.get(category, ()):
            affinity[product.product_id] = value
    for brand, share in brand_shares.items():
        value = w_brand * share
        for product in index.by_brand.get(brand, ()):
            pid = product.product_id
            affinity[pid] = affinity.get(pid, w_cat * cat_shares.get(product.category, 0.0)) + value

    recent = sources["recently_viewed"]
    recent_reason = (
        "You viewed this earlier this week"
        if period == "this week"
        else ("You viewed this recently")
    )
    unbought = [p for p in viewed if p.product_id not in excluded]  # w / (1 + i), i among these
    for i, product in enumerate(unbought[: params.recent_views_used]):
        recent[product.product_id] = params.weight_recent / (1 + i)
        reasons[(product.product_id, "recently_viewed")] = recent_reason

    co_scores = sources["co_occurrence"]
    co_best: dict[str, float] = {}  # the largest single seed's term: its seed words the reason
    seeds = list(dict.fromkeys((*profile.cart, *profile.recent_views, *profile.purchased)))
    for seed in seeds[: params.seeds]:
        seed_product = products.get(seed)
        if seed_product is None:
            continue
        for n in signals.co_occurrence.neighbours(
            seed, params.neighbours_per_seed, min_support=params.co_min_support
        ):
            pid = n.product_id
            term = params.weight_co_occurrence * n.score
            co_scores[pid] = co_scores.get(pid, 0.0) + term
            if pid not in co_best or term > co_best[pid]:
                co_best[pid] = term
                verb = "bought" if n.co_purchases > 0 else "viewed"
                reasons[(pid, "co_occurrence")] = f"Often {verb} with {seed_product.name}"

    trend = sources["trending"]
    for category in top_cats:
        weight = params.weight_trending * cat_shares[category]
        reason = f"Popular in {category.title()} right now"
        for pid, rel in signals.trending.ranked(group=category)[: params.trending_per_category]:
            trend[pid] = trend.get(pid, 0.0) + weight * rel
            reasons.setdefault((pid, "trending"), reason)

    totals: dict[str, float] = defaultdict(float)
    best: dict[str, tuple[float, Source]] = {}
    for source, table in sources.items():
        for pid, value in table.items():
            if value <= 0 or pid in excluded or pid not in products:
                continue
            totals[pid] += value
            if pid not in best or value > best[pid][0]:
                best[pid] = (value, source)
    if not totals:
        return popular_baseline(catalog, signals=signals, k=k, exclude=excluded, params=params)

    fit = _price_fit(profile, index, params.weight_price_fit)
    band = index.band
    ranked = [(total * fit[band[pid]], pid, best[pid][1]) for pid, total in totals.items()]
    ranked = heapq.nsmallest(params.pool_size, ranked, key=lambda r: (-r[0], r[1]))
    picks = _diversify(ranked, products, k, params)
    if len(picks) < k:
        taken = excluded | {pid for _, pid, _ in picks}
        more = _popular_candidates(index, signals, taken, max(params.pool_size, k), None)
        picks += _diversify(more, products, k - len(picks), params, already=picks)
    if len(picks) < k:
        # The category cap cannot be met (a tiny catalog): fill up regardless of it.
        taken = excluded | {pid for _, pid, _ in picks}
        picks += _popular_candidates(index, signals, taken, k - len(picks), None)
    return [
        Recommendation(
            pid,
            score,
            _affinity_reason(products[pid], viewed, period, brand_shares)
            if src == "affinity"
            else reasons.get((pid, src), _popular_reason(score, None)),
            src,
        )
        for score, pid, src in picks
    ]


def _diversify(
    ranked: Sequence[tuple[float, str, Source]],
    products: Mapping[str, Product],
    k: int,
    params: RecommendParams,
    *,
    already: Sequence[tuple[float, str, Source]] = (),
) -> list[tuple[float, str, Source]]:
    """Greedy picks maximizing score * penalties for repeated category/brand (module doc).

    ``already`` are earlier picks whose categories and brands count towards the penalties.
    """
    pool = [(score, pid, src, products[pid]) for score, pid, src in ranked]
    picked: list[tuple[float, str, Source]] = []
    per_category: dict[str, int] = defaultdict(int)
    per_brand: dict[str, int] = defaultdict(int)
    for _, pid, _ in already:
        per_category[products[pid].category] += 1
        per_brand[products[pid].brand] += 1
    cap = params.max_per_category
    cat_pen = params.category_penalty
    brand_pen = params.brand_penalty
    while pool and len(picked) < k:
        best_i = -1
        best_value = -1.0
        for i, (score, _, _, product) in enumerate(pool):
            n_cat = per_category[product.category]
            if n_cat >= cap:
                continue
            value = score * cat_pen**n_cat * brand_pen ** per_brand[product.brand]
            if value > best_value:
                best_i, best_value = i, value
        if best_i < 0:
            break
        score, pid, src, product = pool.pop(best_i)
        per_category[product.category] += 1
        per_brand[product.brand] += 1
        picked.append((score, pid, src))
    return picked


def _popular_candidates(
    index: CatalogIndex,
    signals: RecommendationSignals,
    excluded: set[str],
    wanted: int,
    group: str | None,
) -> list[tuple[float, str, Source]]:
    """Up to ``wanted`` in-stock, not excluded products, most popular first, then catalog order."""
    products = index.products
    candidates: list[tuple[float, str, Source]] = []
    seen: set[str] = set()
    for pid, rel in signals.trending.ranked(group=group):
        if len(candidates) >= wanted:
            return candidates
        product = products.get(pid)
        if product is not None and product.stock > 0 and pid not in excluded:
            candidates.append((rel, pid, "popular"))
            seen.add(pid)
    for product in index.in_stock:
        if len(candidates) >= wanted:
            break
        pid = product.product_id
        if pid not in excluded and pid not in seen and (group is None or product.category == group):
            candidates.append((0.0, pid, "popular"))
    return candidates


def _popular_reason(score: float, group: str | None) -> str:
    """'Popular right now' for a trending product; a product topped up in catalog order
    (relative popularity 0: nothing of it is trending) is not called popular."""
    if score > 0:
        return f"Popular in {group.title()} right now" if group else "Popular right now"
    return f"From our {group.title()} collection" if group else "From our current collection"


def popular_baseline(
    catalog: Catalog,
    *,
    signals: RecommendationSignals,
    k: int = 10,
    exclude: Iterable[str] = (),
    params: RecommendParams | None = None,
    group: str | None = None,
) -> list[Recommendation]:
    """The ``k`` most popular in-stock products (of ``group``, e.g. a category), diversified.

    Falls back to catalog order when nothing is trending yet. The baseline recommendations
    are measured against, and the cold-start answer.
    """
    params = params or RecommendParams()
    index = catalog_index(catalog)
    excluded = set(exclude)
    candidates = _popular_candidates(index, signals, excluded, max(params.pool_size, k), group)
    picks = _diversify(candidates, index.products, k, params)
    if len(picks) < k:
        taken = excluded | {pid for _, pid, _ in picks}
        picks += _popular_candidates(index, signals, taken, k - len(picks), group)
    return [
        Recommendation(pid, score, _popular_reason(score, group), src) for score, pid, src in picks
    ]
