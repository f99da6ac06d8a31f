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


def _text(value: object) -> str | None:
    """A non-empty string, else None (an empty category or brand is none, as for line items)."""
    return value if type(value) is str and value else None


def _price(value: object) -> float | None:
    """A price the sender gave: a number of at least 0 (what the event schemas allow), else None.

    ``bool`` is a subclass of ``int``: ``"price": true`` is not a price of 1.
    """
    if type(value) is not int and type(value) is not float:
        return None
    return float(value) if value >= 0 else None


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
            category = _text(props.get("category"))
            brand = _text(props.get("brand"))
            price = _price(props.get("price"))
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
