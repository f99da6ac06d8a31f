"""Recommendations measured against the simulator's hidden preferences, next to a baseline.

The hit rule and precision@10 are defined in :mod:`pipeline.evaluation`.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from pipeline.catalog import load_catalog
from pipeline.evaluation import PrecisionReport, compare_with_baseline, is_hit, precision_at_k
from pipeline.recommend import signals_from_events
from pipeline.scoring import profile_from_dict
from pipeline.simulate import SimulationConfig, TruePreferences, simulate
from pipeline.testing import replay

END = datetime(2026, 11, 1, tzinfo=UTC)
END_MS = int(END.timestamp() * 1000)


def test_hit_rule() -> None:
    catalog = load_catalog()
    prefs = TruePreferences(
        category_prefs={"dresses": 0.5, "tops": 0.3, "bags": 0.1, "shoes": 0.05, "coats": 0.05},
        brand_prefs={"Linnea": 0.7, "Kestrel": 0.3},
        price_band="mid",
        timezone="UTC",
        active_hours=(20,),
    )
    dress = next(p for p in catalog.values() if p.category == "dresses")
    shoe = next(p for p in catalog.values() if p.category == "shoes")
    assert is_hit(dress, prefs, "mid")
    assert is_hit(dress.__class__(**{**_fields(dress), "brand": "Linnea"}), prefs, "low")
    assert not is_hit(dress.__class__(**{**_fields(dress), "brand": "Urban Loop"}), prefs, "low")
    assert not is_hit(shoe, prefs, "mid")  # shoes are 4th: outside the top 3
    bands = {dress.product_id: "mid", shoe.product_id: "mid"}
    ids = [dress.product_id, shoe.product_id]
    assert precision_at_k(ids, catalog, prefs, bands, k=10) == 0.1  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k of at least 1"):  # (was a ZeroDivisionError)
        precision_at_k(ids, catalog, prefs, bands, k=0)  # type: ignore[arg-type]


def _fields(product: object) -> dict[str, object]:
    return {name: getattr(product, name) for name in product.__slots__}  # type: ignore[attr-defined]


def test_personalized_precision_beats_popularity() -> None:
    catalog = load_catalog()
    sim = simulate(SimulationConfig(6000, end=END, seed=3), catalog)
    result = replay([(m.key, m.value) for m in sim.messages], catalog=catalog, now_ms=END_MS)
    profiles = [profile_from_dict(d) for d in result.profiles.values()]
    signals = signals_from_events(result.events)
    truth = sim.ground_truth
    report = compare_with_baseline(
        profiles,
        truth.preferences,
        catalog,
        truth.product_price_bands,
        signals,
        at_ms=END_MS,
        k=10,
    )
    print(
        f"precision@10 over {report.customers} customers: personalized "
        f"{report.personalized:.3f}, popularity baseline {report.baseline:.3f} "
        f"(lift {report.lift:.1f}x)"
    )
    assert report.customers >= 50
    assert report.personalized >= 0.4
    assert report.personalized >= 3 * report.baseline
    assert report.personalized - report.baseline >= 0.25


def test_no_evidence_is_no_lift() -> None:
    """No customer evaluated, or neither arm hitting anything, is not an infinite lift."""
    assert math.isnan(PrecisionReport(k=10, customers=0, personalized=0.0, baseline=0.0).lift)
    assert PrecisionReport(k=10, customers=5, personalized=0.2, baseline=0.0).lift == math.inf
    assert PrecisionReport(k=10, customers=5, personalized=0.2, baseline=0.1).lift == 2.0
