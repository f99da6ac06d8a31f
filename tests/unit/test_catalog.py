"""The product catalog: the committed sample data, the generator and strict CSV loading."""

from __future__ import annotations

import statistics
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from pipeline.catalog import (
    BRAND_TIERS,
    CATEGORIES,
    CSV_COLUMNS,
    NAME_SEPARATOR,
    Catalog,
    Product,
    generate_catalog,
    load_catalog,
    write_catalog,
)
from pipeline.errors import CatalogError

HEADER = ",".join(CSV_COLUMNS)
GOOD_ROW = "P1,Linen Midi Dress \u2013 Sage,dresses,Nordlys,Sage,linen,79.99,EUR,3"


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


def _write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "catalog.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_committed_catalog_is_large_varied_and_has_sold_out_items(catalog: Catalog) -> None:
    products = list(catalog.values())
    assert len(catalog) >= 500
    assert set(catalog.by_category()) == set(CATEGORIES)
    assert len({p.brand for p in products}) >= 20
    sold_out = sum(1 for p in products if p.stock == 0)
    assert 0.02 * len(products) <= sold_out <= 0.10 * len(products)
    assert all(p.price > 0 and p.currency == "EUR" for p in products)
    assert all(p.name.endswith(NAME_SEPARATOR + p.colour) for p in products)
    assert all(not p.in_stock for p in products if p.stock == 0)


def test_committed_catalog_is_exactly_what_the_generator_produces(catalog: Catalog) -> None:
    assert catalog.products() == tuple(generate_catalog())


def test_generator_is_deterministic_per_seed() -> None:
    assert generate_catalog(120, seed=1) == generate_catalog(120, seed=1)
    assert generate_catalog(120, seed=1) != generate_catalog(120, seed=2)
    assert len(generate_catalog(5, seed=1)) == 5


def test_prices_follow_brand_tier(catalog: Catalog) -> None:
    def mean_price(tier: str) -> float:
        return statistics.mean(p.price for p in catalog.values() if BRAND_TIERS[p.brand] == tier)

    assert mean_price("budget") < mean_price("mid") < mean_price("premium") < mean_price("luxury")
    coats = statistics.mean(p.price for p in catalog.by_category()["coats"])
    tops = statistics.mean(p.price for p in catalog.by_category()["tops"])
    assert coats > 2 * tops


def test_catalog_mapping_is_read_only_and_grouped(catalog: Catalog) -> None:
    first = next(iter(catalog))
    assert catalog[first].product_id == first
    assert catalog.get("no-such-product") is None
    assert sum(len(group) for group in catalog.by_category().values()) == len(catalog)
    with pytest.raises(TypeError):
        catalog.by_category()["dresses"] = ()  # type: ignore[index]
    with pytest.raises(FrozenInstanceError):
        catalog[first].price = 1.0  # type: ignore[misc]


def test_round_trip_through_csv(tmp_path: Path) -> None:
    products = generate_catalog(40, seed=3)
    path = tmp_path / "nested" / "catalog.csv"
    write_catalog(products, path)
    assert path.read_text(encoding="utf-8").splitlines()[0] == HEADER
    assert load_catalog(path).products() == tuple(products)


def test_duplicate_ids_are_refused_in_memory() -> None:
    product = Product("P1", "x", "tops", "b", "Red", "cotton", 10.0, "EUR", 1)
    with pytest.raises(CatalogError, match="P1"):
        Catalog([product, product])


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ((), "empty file"),
        (("id,name", GOOD_ROW), r":1: header"),
        ((HEADER, GOOD_ROW.replace("79.99", "cheap")), r":2: price 'cheap'"),
        ((HEADER, GOOD_ROW, GOOD_ROW.replace(",3", ",-1")), r":3: stock -1 is negative"),
        ((HEADER, GOOD_ROW, GOOD_ROW.replace(",3", ",lots")), r":3: stock 'lots'"),
        ((HEADER, GOOD_ROW.replace("79.99", "0")), r":2: price 0.0 must be a positive number"),
        ((HEADER, GOOD_ROW.replace("79.99", "nan")), r":2: price nan"),
        ((HEADER, GOOD_ROW, GOOD_ROW), r":3: duplicate product_id 'P1'"),
        ((HEADER, "P2,only,three"), r":2: 3 fields, expected 9"),
        ((HEADER, GOOD_ROW.replace("P1,", ",")), r":2: empty product_id"),
        ((HEADER,), "no products"),
    ],
)
def test_bad_files_raise_catalog_error_naming_the_line(
    tmp_path: Path, lines: tuple[str, ...], message: str
) -> None:
    path = _write(tmp_path, *lines) if lines else tmp_path / "catalog.csv"
    if not lines:
        path.write_bytes(b"")
    with pytest.raises(CatalogError, match=message) as caught:
        load_catalog(path)
    assert str(path) in str(caught.value)


def test_missing_and_non_utf8_files_raise_catalog_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(tmp_path / "absent.csv")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(HEADER.encode() + b"\nP1,\xff\xfe,tops,b,Red,cotton,1,EUR,1\n")
    with pytest.raises(CatalogError, match="not UTF-8"):
        load_catalog(binary)


def test_good_single_row_file_loads(tmp_path: Path) -> None:
    loaded = load_catalog(_write(tmp_path, HEADER, GOOD_ROW, ""))
    assert loaded["P1"] == Product(
        "P1", "Linen Midi Dress \u2013 Sage", "dresses", "Nordlys", "Sage", "linen", 79.99, "EUR", 3
    )
