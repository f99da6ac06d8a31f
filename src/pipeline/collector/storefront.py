"""The storefront demo the collector serves: a catalog page tracked by the vendored analytics.js.

``static/storefront.js`` is ``@segment/analytics-next`` bundled from ``storefront/`` (see its
``package.json``); it sends to this same origin, so the page needs no CDN and no CORS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Response
from fastapi.staticfiles import StaticFiles

from pipeline.catalog import Catalog, load_catalog
from pipeline.errors import CatalogError
from pipeline.settings import Settings

STATIC_DIR = Path(__file__).resolve().parent / "static"
STOREFRONT_SOURCES = ("storefront", "local")
"""Sources whose write key the page may embed, in order: a browser key is public by nature."""
MAX_PRODUCTS = 600
_CONFIG_MARK = "__STOREFRONT_CONFIG__"
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; media-src 'self' blob:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def storefront_write_key(settings: Settings) -> str | None:
    """The write key the page embeds: the ``storefront`` source's, else the dev ``local`` key."""
    keys = settings.collector.write_keys
    for source in STOREFRONT_SOURCES:
        if source in keys:
            return keys[source].get_secret_value()
    return None


def render_page(template: str, write_key: str) -> str:
    """The page with its config JSON inlined; ``<`` is escaped so it cannot close the script."""
    config = json.dumps({"writeKey": write_key}).replace("<", "\\u003c")
    return template.replace(_CONFIG_MARK, config)


def catalog_payload(catalog: Catalog, category: str | None, limit: int) -> dict[str, Any]:
    """Products of ``category`` (all when ``None``) in catalog order, and every category."""
    products = catalog.products() if not category else catalog.by_category().get(category, ())
    return {
        "categories": sorted(catalog.by_category()),
        "products": [
            {
                "product_id": p.product_id,
                "name": p.name,
                "category": p.category,
                "brand": p.brand,
                "colour": p.colour,
                "price": p.price,
                "currency": p.currency,
                "stock": p.stock,
            }
            for p in products[:limit]
        ],
    }


def _error(status: int, code: str, message: str) -> Response:
    body = json.dumps({"success": False, "error": {"code": code, "message": message}})
    return Response(body, status, media_type="application/json")


def register_storefront(app: FastAPI, settings: Settings) -> None:
    """Add ``GET /storefront``, ``/storefront/catalog.json`` and ``/storefront/static/*``."""
    catalogs: list[Catalog] = []

    @app.get("/storefront", include_in_schema=False)
    async def storefront_page() -> Response:
        """The demo page, tracked with the storefront's write key."""
        write_key = storefront_write_key(settings)
        if write_key is None:
            sources = " or ".join(repr(s) for s in STOREFRONT_SOURCES)
            return _error(404, "storefront_disabled", f"no write key for source {sources}")
        template = (STATIC_DIR / "storefront.html").read_text(encoding="utf-8")
        headers = {"Cache-Control": "no-store", "Content-Security-Policy": CONTENT_SECURITY_POLICY}
        return Response(render_page(template, write_key), 200, headers, media_type="text/html")

    @app.get("/storefront/catalog.json", include_in_schema=False)
    async def storefront_catalog(
        category: str | None = None, limit: int = Query(48, ge=1, le=MAX_PRODUCTS)
    ) -> Response:
        """Products for the page; the catalog is read once, at the first request."""
        if not catalogs:
            try:
                catalogs.append(load_catalog(settings.catalog_path))
            except CatalogError as exc:
                return _error(503, "catalog_unavailable", str(exc))
        body = json.dumps(catalog_payload(catalogs[0], category, limit))
        return Response(body, 200, media_type="application/json")

    app.mount("/storefront/static", StaticFiles(directory=STATIC_DIR), name="storefront-static")
