"""The fashion-retail product catalog: typed records, CSV loading and a seeded generator.

Catalog enrichment and recommendations read it; the simulator draws products from it. The
committed ``sample_data/catalog.csv`` is produced by :func:`generate_catalog` with the defaults.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from pipeline.errors import CatalogError

CSV_COLUMNS = (
    "product_id",
    "name",
    "category",
    "brand",
    "colour",
    "material",
    "price",
    "currency",
    "stock",
)

DEFAULT_CATALOG_PATH = Path(__file__).resolve().parents[2] / "sample_data" / "catalog.csv"


@dataclass(frozen=True, slots=True)
class Product:
    """One sellable item; ``stock`` 0 means out of stock (viewable, not purchasable)."""

    product_id: str
    name: str
    category: str
    brand: str
    colour: str
    material: str
    price: float
    currency: str
    stock: int

    @property
    def in_stock(self) -> bool:
        return self.stock > 0


class Catalog(Mapping[str, Product]):
    """An immutable mapping ``product_id -> Product`` that keeps the file's order."""

    __slots__ = ("_by_category", "_products")

    def __init__(self, products: Iterable[Product]) -> None:
        items: dict[str, Product] = {}
        for product in products:
            if product.product_id in items:
                raise CatalogError(f"duplicate product_id {product.product_id!r}")
            items[product.product_id] = product
        self._products: Mapping[str, Product] = MappingProxyType(items)
        grouped: dict[str, list[Product]] = {}
        for product in items.values():
            grouped.setdefault(product.category, []).append(product)
        self._by_category: Mapping[str, tuple[Product, ...]] = MappingProxyType(
            {category: tuple(group) for category, group in grouped.items()}
        )

    def __getitem__(self, product_id: str) -> Product:
        return self._products[product_id]

    def __len__(self) -> int:
        return len(self._products)

    def __iter__(self) -> Iterator[str]:
        return iter(self._products)

    def __repr__(self) -> str:
        return f"Catalog({len(self)} products, {len(self._by_category)} categories)"

    def products(self) -> tuple[Product, ...]:
        """Every product, in catalog order."""
        return tuple(self._products.values())

    def by_category(self) -> Mapping[str, tuple[Product, ...]]:
        """Products grouped by category, each group in catalog order."""
        return self._by_category


def load_catalog(path: Path | None = None) -> Catalog:
    """Read a catalog CSV (header ``CSV_COLUMNS``); any bad row raises naming the file and line."""
    source = DEFAULT_CATALOG_PATH if path is None else Path(path)
    try:
        with source.open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise CatalogError(f"{source}: empty file, expected header {','.join(CSV_COLUMNS)}")
            if tuple(h.strip() for h in header) != CSV_COLUMNS:
                raise CatalogError(
                    f"{source}:1: header {header!r} differs from {','.join(CSV_COLUMNS)}"
                )
            products: list[Product] = []
            seen: set[str] = set()
            for row in reader:
                line = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue
                product = _parse_row(row, source, line)
                if product.product_id in seen:
                    raise CatalogError(
                        f"{source}:{line}: duplicate product_id {product.product_id!r}"
                    )
                seen.add(product.product_id)
                products.append(product)
    except OSError as exc:
        raise CatalogError(f"{source}: cannot read catalog: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{source}: not UTF-8 text: {exc}") from exc
    except csv.Error as exc:
        raise CatalogError(f"{source}: malformed CSV: {exc}") from exc
    if not products:
        raise CatalogError(f"{source}: no products")
    return Catalog(products)


def _parse_row(row: list[str], source: Path, line: int) -> Product:
    if len(row) != len(CSV_COLUMNS):
        raise CatalogError(f"{source}:{line}: {len(row)} fields, expected {len(CSV_COLUMNS)}")
    values = dict(zip(CSV_COLUMNS, (cell.strip() for cell in row), strict=True))
    for column in ("product_id", "name", "category", "brand", "currency"):
        if not values[column]:
            raise CatalogError(f"{source}:{line}: empty {column}")
    try:
        price = float(values["price"])
    except ValueError:
        raise CatalogError(f"{source}:{line}: price {values['price']!r} is not a number") from None
    if not math.isfinite(price) or price <= 0:
        raise CatalogError(f"{source}:{line}: price {price} must be a positive number")
    try:
        stock = int(values["stock"])
    except ValueError:
        raise CatalogError(
            f"{source}:{line}: stock {values['stock']!r} is not an integer"
        ) from None
    if stock < 0:
        raise CatalogError(f"{source}:{line}: stock {stock} is negative")
    return Product(
        product_id=values["product_id"],
        name=values["name"],
        category=values["category"],
        brand=values["brand"],
        colour=values["colour"],
        material=values["material"],
        price=price,
        currency=values["currency"],
        stock=stock,
    )


def write_catalog(products: Iterable[Product], path: Path) -> None:
    """Write products as CSV with a header, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for p in products:
            writer.writerow(
                (
                    p.product_id,
                    p.name,
                    p.category,
                    p.brand,
                    p.colour,
                    p.material,
                    f"{p.price:.2f}",
                    p.currency,
                    p.stock,
                )
            )


_ProductTypes = tuple[tuple[str, tuple[str, ...]], ...]

# Mid-tier price range in EUR, relative popularity, and (product type, materials) per category.
_CATEGORIES: dict[str, tuple[tuple[float, float], float, _ProductTypes]] = {
    "dresses": (
        (39.0, 119.0),
        1.6,
        (
            ("Midi Dress", ("linen", "cotton", "viscose", "silk")),
            ("Maxi Dress", ("linen", "cotton", "viscose")),
            ("Wrap Dress", ("jersey", "viscose", "silk")),
            ("Slip Dress", ("satin", "silk")),
            ("Shirt Dress", ("cotton", "linen", "denim")),
            ("Mini Dress", ("cotton", "satin", "jersey")),
        ),
    ),
    "tops": (
        (15.0, 49.0),
        1.6,
        (
            ("T-Shirt", ("cotton", "jersey", "linen")),
            ("Blouse", ("silk", "viscose", "cotton")),
            ("Tank Top", ("cotton", "jersey")),
            ("Shirt", ("cotton", "linen", "poplin")),
            ("Camisole", ("silk", "satin")),
        ),
    ),
    "jeans": (
        (39.0, 99.0),
        1.2,
        (
            ("Straight Jeans", ("denim",)),
            ("Wide-Leg Jeans", ("denim",)),
            ("Skinny Jeans", ("denim",)),
            ("Mom Jeans", ("denim",)),
            ("Bootcut Jeans", ("denim",)),
        ),
    ),
    "trousers": (
        (35.0, 89.0),
        1.0,
        (
            ("Tailored Trousers", ("wool", "twill", "linen")),
            ("Wide-Leg Trousers", ("linen", "cotton", "viscose")),
            ("Cargo Trousers", ("cotton", "twill")),
            ("Chinos", ("cotton", "twill")),
            ("Culottes", ("linen", "cotton")),
        ),
    ),
    "skirts": (
        (29.0, 79.0),
        0.8,
        (
            ("Midi Skirt", ("satin", "linen", "cotton")),
            ("Pleated Skirt", ("satin", "wool")),
            ("Mini Skirt", ("denim", "leather", "cotton")),
            ("A-Line Skirt", ("cotton", "wool", "corduroy")),
        ),
    ),
    "knitwear": (
        (35.0, 109.0),
        1.0,
        (
            ("Cardigan", ("wool", "cashmere", "cotton")),
            ("Crew-Neck Jumper", ("merino", "cashmere", "cotton")),
            ("Roll-Neck Jumper", ("merino", "cashmere", "wool")),
            ("Knitted Vest", ("wool", "cotton")),
        ),
    ),
    "jackets": (
        (59.0, 179.0),
        0.9,
        (
            ("Bomber Jacket", ("nylon", "satin", "leather")),
            ("Denim Jacket", ("denim",)),
            ("Biker Jacket", ("leather", "suede")),
            ("Blazer", ("wool", "linen", "twill")),
            ("Utility Jacket", ("cotton", "twill")),
        ),
    ),
    "coats": (
        (89.0, 259.0),
        0.8,
        (
            ("Trench Coat", ("cotton", "twill")),
            ("Wool Coat", ("wool", "cashmere")),
            ("Puffer Coat", ("nylon", "recycled polyester")),
            ("Parka", ("cotton", "nylon")),
            ("Teddy Coat", ("faux shearling",)),
        ),
    ),
    "shoes": (
        (49.0, 139.0),
        0.9,
        (
            ("Loafers", ("leather", "suede")),
            ("Ballet Flats", ("leather", "satin")),
            ("Mules", ("leather", "suede")),
            ("Heeled Sandals", ("leather", "satin")),
            ("Pumps", ("leather", "suede")),
        ),
    ),
    "sneakers": (
        (55.0, 139.0),
        1.0,
        (
            ("Low-Top Sneakers", ("leather", "canvas", "suede")),
            ("High-Top Sneakers", ("canvas", "leather")),
            ("Running Sneakers", ("mesh", "recycled polyester")),
            ("Platform Sneakers", ("leather", "canvas")),
        ),
    ),
    "boots": (
        (69.0, 199.0),
        0.8,
        (
            ("Chelsea Boots", ("leather", "suede")),
            ("Ankle Boots", ("leather", "suede")),
            ("Knee-High Boots", ("leather",)),
            ("Combat Boots", ("leather",)),
        ),
    ),
    "bags": (
        (35.0, 159.0),
        0.9,
        (
            ("Tote Bag", ("canvas", "leather", "raffia")),
            ("Crossbody Bag", ("leather", "nylon")),
            ("Shoulder Bag", ("leather", "suede")),
            ("Backpack", ("nylon", "leather", "canvas")),
            ("Clutch", ("satin", "leather")),
        ),
    ),
    "accessories": (
        (9.0, 59.0),
        0.9,
        (
            ("Scarf", ("silk", "wool", "cashmere")),
            ("Belt", ("leather",)),
            ("Beanie", ("wool", "cashmere", "merino")),
            ("Cap", ("cotton", "canvas")),
            ("Sunglasses", ("acetate",)),
            ("Hair Clip", ("acetate",)),
        ),
    ),
    "activewear": (
        (19.0, 69.0),
        0.8,
        (
            ("Leggings", ("recycled polyester", "nylon")),
            ("Sports Bra", ("recycled polyester", "nylon")),
            ("Running Shorts", ("recycled polyester",)),
            ("Training Top", ("recycled polyester", "cotton")),
            ("Track Jacket", ("recycled polyester", "nylon")),
        ),
    ),
    "swimwear": (
        (19.0, 65.0),
        0.6,
        (
            ("Bikini Top", ("recycled nylon", "lycra")),
            ("Bikini Bottoms", ("recycled nylon", "lycra")),
            ("Swimsuit", ("recycled nylon", "lycra")),
            ("Beach Cover-Up", ("linen", "cotton")),
        ),
    ),
    "lingerie": (
        (12.0, 55.0),
        0.6,
        (
            ("Bralette", ("lace", "cotton", "modal")),
            ("Briefs", ("cotton", "lace", "modal")),
            ("Slip", ("silk", "satin")),
            ("Bodysuit", ("lace", "modal")),
            ("Pyjama Set", ("silk", "cotton", "modal")),
        ),
    ),
}

CATEGORIES: tuple[str, ...] = tuple(_CATEGORIES)

# Fictional brands and their tier; the tier multiplies the category's mid-tier price.
BRAND_TIERS: dict[str, str] = {
    "Basic Thread": "budget",
    "Urban Loop": "budget",
    "Nova Street": "budget",
    "Pebble & Co": "budget",
    "Kin Studio": "budget",
    "Daily Edit": "budget",
    "Maison Verte": "mid",
    "Nordlys": "mid",
    "Juniper Lane": "mid",
    "Harbour & Pine": "mid",
    "Atelier Rue": "mid",
    "Sol Mar": "mid",
    "Fern Collective": "mid",
    "Oak & Ivy": "mid",
    "Velo Active": "mid",
    "Linnea": "premium",
    "Corso Nove": "premium",
    "Kestrel": "premium",
    "Aurelie Blanc": "premium",
    "Ostara": "premium",
    "Saltwater Studio": "premium",
    "Valentina Orsi": "luxury",
    "Hallberg": "luxury",
    "Maison Ardent": "luxury",
    "Ishikawa": "luxury",
}

_TIER_MULTIPLIER = {"budget": 0.6, "mid": 1.0, "premium": 1.7, "luxury": 3.2}
_TIER_WEIGHT = {"budget": 1.3, "mid": 1.0, "premium": 0.7, "luxury": 0.4}

_COLOURS = (
    "Black",
    "White",
    "Ivory",
    "Navy",
    "Sage",
    "Olive",
    "Camel",
    "Burgundy",
    "Blush",
    "Cobalt",
    "Charcoal",
    "Sand",
    "Rust",
    "Lilac",
    "Forest Green",
    "Stone",
    "Terracotta",
    "Chocolate",
    "Powder Blue",
    "Red",
)
NAME_SEPARATOR = " \u2013 "
"""Between a product's description and its colour, as in "Linen Midi Dress \u2013 Sage"."""

_DENIM_COLOURS = ("Indigo", "Light Wash", "Mid Wash", "Black", "Ecru", "Grey Wash")
_DENIM_STYLES = ("Organic", "Stretch", "Rigid", "Vintage", "Relaxed")


def generate_catalog(n: int = 600, seed: int = 7) -> list[Product]:
    """Generate ``n`` realistic fashion products; the same seed always gives the same list."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    rng = random.Random(seed)
    categories = list(_CATEGORIES)
    category_weights = [_CATEGORIES[c][1] for c in categories]
    brands = list(BRAND_TIERS)
    brand_weights = [_TIER_WEIGHT[BRAND_TIERS[b]] for b in brands]
    products: list[Product] = []
    # Cover every category before sampling by popularity, so small catalogs stay varied.
    extra = max(0, n - len(categories))
    order = categories[:n] + rng.choices(categories, category_weights, k=extra)
    for index, category in enumerate(order, start=1):
        (low, high), _, types = _CATEGORIES[category]
        product_type, materials = rng.choice(types)
        material = rng.choice(materials)
        brand = rng.choices(brands, brand_weights)[0]
        if material == "denim":
            colour = rng.choice(_DENIM_COLOURS)
            denim_named = "Jeans" in product_type or "Denim" in product_type
            style = rng.choice(_DENIM_STYLES) if denim_named else "Denim"
        else:
            colour = rng.choice(_COLOURS)
            style = material.title()
        name = f"{style} {product_type}{NAME_SEPARATOR}{colour}"
        price = _price(rng.uniform(low, high) * _TIER_MULTIPLIER[BRAND_TIERS[brand]])
        low_stock = rng.random() < 0.3
        stock = rng.randint(1, 12) if low_stock else rng.randint(13, 400)
        if rng.random() < 0.05:
            stock = 0
        products.append(
            Product(
                product_id=f"P{index:05d}",
                name=name,
                category=category,
                brand=brand,
                colour=colour,
                material=material,
                price=price,
                currency="EUR",
                stock=stock,
            )
        )
    return products


def _price(raw: float) -> float:
    """Round to a shop price: .99 endings below 100 EUR, whole fives above."""
    if raw < 100:
        return round(max(5, round(raw)) - 0.01, 2)
    return float(round(raw / 5) * 5)
