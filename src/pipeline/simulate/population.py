"""Simulated shoppers: who they are, where they live, what they like and which devices they use."""

from __future__ import annotations

import math
import random
import unicodedata
from collections.abc import Sequence

from pipeline.catalog import BRAND_TIERS, Catalog
from pipeline.simulate.model import ANONYMOUS_PREFIX, Device, DeviceType, PriceBand, TrueCustomer

# (IANA zone, share of customers): a Europe-first retailer with some international reach.
TIMEZONES: tuple[tuple[str, float], ...] = (
    ("Europe/London", 0.22),
    ("Europe/Paris", 0.17),
    ("Europe/Berlin", 0.12),
    ("Europe/Madrid", 0.07),
    ("Europe/Amsterdam", 0.05),
    ("Europe/Stockholm", 0.03),
    ("America/New_York", 0.11),
    ("America/Chicago", 0.04),
    ("America/Los_Angeles", 0.06),
    ("Asia/Tokyo", 0.04),
    ("Asia/Singapore", 0.03),
    ("Australia/Sydney", 0.06),
)

FIRST_NAMES = (
    "Emma",
    "Olivia",
    "Amelia",
    "Isla",
    "Ava",
    "Sophie",
    "Chloé",
    "Léa",
    "Manon",
    "Camille",
    "Hannah",
    "Mia",
    "Lena",
    "Clara",
    "Lucía",
    "Sofía",
    "Martina",
    "Elena",
    "Giulia",
    "Sara",
    "Freya",
    "Astrid",
    "Maja",
    "Noor",
    "Yuki",
    "Hana",
    "Aoi",
    "Mei",
    "Priya",
    "Aisha",
    "Grace",
    "Zoe",
    "Lily",
    "Ella",
    "Ruby",
    "Charlotte",
    "Madison",
    "Harper",
    "Abigail",
    "Emily",
    "Liam",
    "Noah",
    "Oliver",
    "Lucas",
    "Hugo",
    "Louis",
    "Ben",
    "Felix",
    "Mateo",
    "Leo",
    "James",
    "Ethan",
    "Daniel",
    "Kenji",
    "Arjun",
    "Omar",
    "Jonas",
    "Elias",
    "Marco",
    "Théo",
)
LAST_NAMES = (
    "Smith",
    "Jones",
    "Taylor",
    "Brown",
    "Wilson",
    "Evans",
    "Martin",
    "Bernard",
    "Dubois",
    "Durand",
    "Lefèvre",
    "Moreau",
    "Müller",
    "Schmidt",
    "Schneider",
    "Fischer",
    "Weber",
    "García",
    "Martínez",
    "López",
    "Rossi",
    "Russo",
    "Ferrari",
    "de Vries",
    "Jansen",
    "Andersson",
    "Johansson",
    "Nilsson",
    "Sato",
    "Suzuki",
    "Takahashi",
    "Tanaka",
    "Tan",
    "Lim",
    "Patel",
    "Khan",
    "Williams",
    "Miller",
    "Davis",
    "Anderson",
    "Thompson",
    "Clarke",
    "Walker",
    "Nguyen",
    "O'Brien",
    "Kelly",
    "Murphy",
    "Novak",
    "Kowalski",
    "Costa",
)
EMAIL_DOMAINS = ("example.com", "example.org", "example.net", "mail.example")

USER_AGENTS: dict[DeviceType, tuple[str, ...]] = {
    "mobile": (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/126.0.0.0 Mobile Safari/537.36",
        "Mozilla/5.0 (Linux; Android 14; SM-S921B) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/126.0.0.0 Mobile Safari/537.36",
    ),
    "desktop": (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.5 Safari/605.1.15",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:127.0) Gecko/20100101 Firefox/127.0",
    ),
    "tablet": (
        "Mozilla/5.0 (iPad; CPU OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
        "Mozilla/5.0 (Linux; Android 14; SM-X710) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
    ),
}

# Relative traffic by local hour: quiet nights, a commute and lunch bump, a strong evening peak.
DIURNAL_WEIGHTS: tuple[float, ...] = (
    0.25,
    0.12,
    0.06,
    0.04,
    0.04,
    0.08,
    0.25,
    0.6,
    0.9,
    0.8,
    0.7,
    0.75,
    1.0,
    1.0,
    0.8,
    0.75,
    0.8,
    0.95,
    1.2,
    1.6,
    2.0,
    2.1,
    1.6,
    0.8,
)

# Chronotype: (share of customers, earliest start hour, latest start hour) of their online window.
_CHRONOTYPES: tuple[tuple[float, int, int], ...] = (
    (0.55, 18, 20),
    (0.15, 11, 12),
    (0.15, 6, 8),
    (0.15, 21, 23),
)

_BAND_TIER_AFFINITY: dict[PriceBand, dict[str, float]] = {
    "low": {"budget": 4.0, "mid": 2.0, "premium": 0.4, "luxury": 0.1},
    "mid": {"budget": 1.5, "mid": 4.0, "premium": 1.5, "luxury": 0.3},
    "high": {"budget": 0.2, "mid": 1.0, "premium": 4.0, "luxury": 3.0},
}
_PRICE_BANDS: tuple[PriceBand, ...] = ("low", "mid", "high")


def new_id(rng: random.Random) -> str:
    """A UUID-4-shaped id drawn from ``rng`` (never from the OS), so runs are reproducible."""
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def price_bands(catalog: Catalog) -> dict[str, PriceBand]:
    """Each product's price band: the lower, middle or upper third of prices in its category."""
    bands: dict[str, PriceBand] = {}
    for products in catalog.by_category().values():
        ranked = sorted(products, key=lambda p: (p.price, p.product_id))
        n = len(ranked)
        for i, product in enumerate(ranked):
            bands[product.product_id] = _PRICE_BANDS[min(2, 3 * i // n)]
    return bands


def _normalized(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()}


def _weighted_sample(
    rng: random.Random, items: Sequence[str], weights: Sequence[float], k: int
) -> list[str]:
    """Draw ``k`` distinct items with probability proportional to weight."""
    pool = list(items)
    w = list(weights)
    chosen: list[str] = []
    for _ in range(min(k, len(pool))):
        i = rng.choices(range(len(pool)), w)[0]
        chosen.append(pool.pop(i))
        w.pop(i)
    return chosen


def _active_hours(rng: random.Random) -> tuple[int, ...]:
    _, low, high = rng.choices(_CHRONOTYPES, [c[0] for c in _CHRONOTYPES])[0]
    first = rng.randint(low, high)
    hours = [(first + i) % 24 for i in range(rng.randint(3, 4))]
    if rng.random() < 0.4:
        hours.append(rng.choice((7, 8, 12, 13)))
    return tuple(sorted(set(hours)))


def _category_prefs(rng: random.Random, categories: Sequence[str]) -> dict[str, float]:
    """Concentrated tastes: 2-3 main categories carry 85-93% of the weight."""
    main = rng.sample(list(categories), rng.choice((2, 2, 3)))
    rest = [c for c in categories if c not in main]
    minor = rng.sample(rest, min(len(rest), rng.randint(2, 3)))
    main_share = rng.uniform(0.85, 0.93)
    main_w = _normalized({c: rng.gammavariate(3.0, 1.0) for c in main})
    minor_w = _normalized({c: rng.gammavariate(2.0, 1.0) for c in minor}) if minor else {}
    prefs = {c: w * main_share for c, w in main_w.items()}
    prefs.update({c: w * (1.0 - main_share) for c, w in minor_w.items()})
    return _normalized(prefs) if not minor else prefs


def _brand_prefs(rng: random.Random, band: PriceBand, brands: Sequence[str]) -> dict[str, float]:
    affinity = _BAND_TIER_AFFINITY[band]
    weights = [affinity.get(BRAND_TIERS.get(b, "mid"), 1.0) for b in brands]
    chosen = _weighted_sample(rng, brands, weights, rng.randint(2, 4))
    return _normalized({b: rng.gammavariate(2.0, 1.0) for b in chosen})


def _devices(rng: random.Random, count: int) -> tuple[Device, ...]:
    first: DeviceType = "mobile" if rng.random() < 0.7 else "desktop"
    second: DeviceType = "desktop" if first == "mobile" else "mobile"
    kinds: list[DeviceType] = [first, second, "tablet"][:count]
    return tuple(Device(new_id(rng), kind, rng.choice(USER_AGENTS[kind])) for kind in kinds)


def _email(first: str, last: str, number: int, rng: random.Random) -> str:
    local = f"{first}.{last}".lower().replace(" ", "").replace("'", "")
    ascii_local = unicodedata.normalize("NFKD", local).encode("ascii", "ignore").decode("ascii")
    return f"{ascii_local}.{number}@{rng.choice(EMAIL_DOMAINS)}"


def make_visitor(
    rng: random.Random,
    number: int,
    *,
    known: bool,
    categories: Sequence[str],
    brands: Sequence[str],
) -> TrueCustomer:
    """Draw one visitor; known ones are ``cus_<number>``, others ``anon:<anonymousId>``.

    ``categories`` and ``brands`` are the catalog's, sorted, so preferences name real products.
    """
    timezone = rng.choices([t for t, _ in TIMEZONES], [w for _, w in TIMEZONES])[0]
    band = rng.choices(_PRICE_BANDS, (0.35, 0.45, 0.2))[0]
    activity = math.exp(rng.gauss(0.0, 0.8))
    category_prefs = _category_prefs(rng, categories)
    brand_prefs = _brand_prefs(rng, band, brands)
    hours = _active_hours(rng)
    if known:
        devices = _devices(rng, rng.choices((1, 2, 3), (0.45, 0.4, 0.15))[0])
        first = rng.choice(FIRST_NAMES)
        last = rng.choice(LAST_NAMES)
        return TrueCustomer(
            customer_id=f"cus_{number:06d}",
            is_known=True,
            email=_email(first, last, number, rng),
            first_name=first,
            last_name=last,
            timezone=timezone,
            active_hours=hours,
            category_prefs=category_prefs,
            brand_prefs=brand_prefs,
            price_band=band,
            devices=devices,
            activity=activity,
        )
    devices = _devices(rng, 1)
    return TrueCustomer(
        customer_id=ANONYMOUS_PREFIX + devices[0].anonymous_id,
        is_known=False,
        email=None,
        first_name=None,
        last_name=None,
        timezone=timezone,
        active_hours=hours,
        category_prefs=category_prefs,
        brand_prefs=brand_prefs,
        price_band=band,
        devices=devices,
        activity=activity * 0.4,
    )
