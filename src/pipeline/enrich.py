"""Catalog enrichment: trusted category, brand and price for the products an event mentions.

The catalog is the source of truth; what a tracker put in ``properties`` is used only for
products the catalog does not know (and such events are still processed).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from pipeline.events import CleanEvent, LineItem


class ProductInfo(Protocol):
    @property
    def category(self) -> str: ...
    @property
    def brand(self) -> str: ...
    @property
    def price(self) -> float: ...


class ProductLookup(Protocol):
    def get(self, product_id: str) -> ProductInfo | None: ...


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def enrich(event: CleanEvent, catalog: ProductLookup) -> CleanEvent:
    """Return ``event`` with catalog fields filled in for its product and line items."""
    category = brand = None
    price: float | None = None
    if event.product_id is not None:
        product = catalog.get(event.product_id)
        if product is not None:
            category, brand, price = product.category, product.brand, product.price
        else:
            props = event.properties
            category = _str_or_none(props.get("category"))
            brand = _str_or_none(props.get("brand"))
            raw_price = props.get("price")
            price = float(raw_price) if isinstance(raw_price, int | float) else None
    items = event.items
    if items:
        enriched = []
        for item in items:
            product = catalog.get(item.product_id)
            if product is None:
                enriched.append(item)
            else:
                enriched.append(
                    LineItem(
                        item.product_id, item.quantity, item.price, product.category, product.brand
                    )
                )
        items = tuple(enriched)
    if category is None and brand is None and price is None and items is event.items:
        return event
    return replace(event, category=category, brand=brand, price=price, items=items)
