"""Recommendation quality against the simulator's hidden truth; pure, for tests and notebooks.

A recommended product is a **hit** for a customer when its category is among the customer's
true top-``top_categories`` categories (by ``category_prefs`` weight) **and** either its brand
is one of the customer's true brands (every brand in ``brand_prefs``, 2-4 of them) or its price
band (lower/middle/upper third of prices in its category) is the customer's true ``price_band``.

``precision@k`` is hits divided by ``k`` (a list shorter than ``k`` counts the gap as misses),
averaged over the customers evaluated. The personalized recommender is compared with
:func:`~pipeline.recommend.popular_baseline` (most popular in-stock items not yet bought).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pipeline.catalog import Catalog, Product
from pipeline.recommend import (
    RecommendationSignals,
    RecommendParams,
    popular_baseline,
    recommend,
)
from pipeline.scoring import Profile
from pipeline.simulate import PriceBand, TruePreferences

TOP_CATEGORIES = 3


def is_hit(
    product: Product,
    preferences: TruePreferences,
    band: PriceBand,
    *,
    top_categories: int = TOP_CATEGORIES,
) -> bool:
    """Whether ``product`` (in price band ``band``) fits the customer's true tastes (module doc)."""
    prefs = preferences.category_prefs
    top = sorted(prefs, key=lambda c: (-prefs[c], c))[:top_categories]
    if product.category not in top:
        return False
    return product.brand in preferences.brand_prefs or band == preferences.price_band


def precision_at_k(
    product_ids: Sequence[str],
    catalog: Catalog,
    preferences: TruePreferences,
    bands: Mapping[str, PriceBand],
    *,
    k: int = 10,
    top_categories: int = TOP_CATEGORIES,
) -> float:
    """Hits among the first ``k`` ids divided by ``k`` (at least 1)."""
    if k < 1:
        raise ValueError(f"precision@k needs k of at least 1, not {k}")
    hits = sum(
        1
        for pid in product_ids[:k]
        if pid in catalog
        and is_hit(catalog[pid], preferences, bands[pid], top_categories=top_categories)
    )
    return hits / k


@dataclass(frozen=True, slots=True)
class PrecisionReport:
    """Mean precision@k of the personalized recommender and of the popularity baseline."""

    k: int
    customers: int
    personalized: float
    baseline: float

    @property
    def lift(self) -> float:
        """``personalized / baseline``: infinite when only the baseline scores 0, NaN when
        both do or no customer was evaluated (no evidence either way)."""
        if self.baseline > 0:
            return self.personalized / self.baseline
        return float("inf") if self.personalized > 0 else math.nan


def compare_with_baseline(
    profiles: Iterable[Profile],
    preferences: Mapping[str, TruePreferences],
    catalog: Catalog,
    bands: Mapping[str, PriceBand],
    signals: RecommendationSignals,
    *,
    at_ms: int,
    k: int = 10,
    min_events: int = 1,
    params: RecommendParams | None = None,
) -> PrecisionReport:
    """precision@k of :func:`recommend` and :func:`popular_baseline` over every profile with
    known true preferences and at least ``min_events`` events."""
    if k < 1:
        raise ValueError(f"precision@k needs k of at least 1, not {k}")
    personal: list[float] = []
    baseline: list[float] = []
    for profile in profiles:
        truth = preferences.get(profile.customer_id)
        if truth is None or profile.event_count < min_events:
            continue
        recs = recommend(profile, catalog, k=k, signals=signals, params=params, at_ms=at_ms)
        popular = popular_baseline(
            catalog, signals=signals, k=k, exclude=profile.purchased, params=params
        )
        personal.append(precision_at_k([r.product_id for r in recs], catalog, truth, bands, k=k))
        baseline.append(precision_at_k([r.product_id for r in popular], catalog, truth, bands, k=k))
    if not personal:
        return PrecisionReport(k=k, customers=0, personalized=math.nan, baseline=math.nan)
    return PrecisionReport(
        k=k,
        customers=len(personal),
        personalized=statistics.fmean(personal),
        baseline=statistics.fmean(baseline),
    )
