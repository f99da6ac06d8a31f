"""Catalog enrichment: the catalog's fields for products it knows, the sender's otherwise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from pipeline.enrich import enrich
from pipeline.events import LineItem
from pipeline.testing import make_event


@dataclass(frozen=True)
class Product:
    category: str
    brand: str
    price: float


class Catalog:
    def __init__(self, **products: Product) -> None:
        self._products = products

    def get(self, product_id: str) -> Product | None:
        return self._products.get(product_id)


CATALOG = Catalog(P1=Product("dresses", "Lune", 79.0))


def _viewed(product_id: str, **properties: Any) -> Any:
    return make_event(
        "Product Viewed", product_id=product_id, properties={"product_id": product_id, **properties}
    )


def test_the_catalog_wins_for_a_product_it_knows() -> None:
    event = enrich(_viewed("P1", category="shoes", brand="X", price=1.0), CATALOG)
    assert (event.category, event.brand, event.price) == ("dresses", "Lune", 79.0)


def test_an_unknown_product_keeps_what_the_sender_said() -> None:
    event = enrich(_viewed("NEW", category="shoes", brand="X", price=12), CATALOG)
    assert (event.category, event.brand, event.price) == ("shoes", "X", 12.0)
    assert type(event.price) is float


@pytest.mark.parametrize(
    "properties",
    [
        {"category": "", "brand": "", "price": True},  # empty is none; true is not a price of 1
        {"category": 7, "brand": None, "price": -3},  # not text; below the schemas' minimum 0
        {"price": "12,50 EUR"},  # text is not parsed as a price
        {"price": False},
    ],
)
def test_what_an_unknown_product_cannot_be_is_none(properties: dict[str, Any]) -> None:
    event = enrich(_viewed("NEW", **properties), CATALOG)
    assert (event.category, event.brand, event.price) == (None, None, None)


def test_line_items_take_the_catalogs_category_and_brand_and_keep_their_price() -> None:
    items = (LineItem("P1", 2, 70.0), LineItem("NEW", 1, 5.0, "bags", None))
    event = enrich(make_event("Order Completed", items=items, revenue=145.0), CATALOG)
    assert event.items == (LineItem("P1", 2, 70.0, "dresses", "Lune"), items[1])
