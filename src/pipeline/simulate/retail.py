"""Fashion-retail traffic in the Segment spec, with injected faults and exact ground truth.

Each visitor's timeline is generated in event-time order (so carts persist across sessions and
a device logs in before it acts logged in); timelines are then merged in delivery order. One
seeded ``random.Random`` drives everything and the wall clock is never read, so a seed and a
config always give the same bytes.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from itertools import accumulate
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from pipeline.catalog import Catalog, Product
from pipeline.events import ms_to_iso
from pipeline.identity import partition_key
from pipeline.simulate.faults import malformed_messages
from pipeline.simulate.model import (
    ANONYMOUS_PREFIX,
    LIBRARY,
    Device,
    GroundTruth,
    PriceBand,
    RawMessage,
    Simulation,
    SimulationConfig,
    TrueCustomer,
)
from pipeline.simulate.population import DIURNAL_WEIGHTS, make_visitor, new_id, price_bands

SHOP_URL = "https://shop.example.com"
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
_COMMERCE_EVENTS = frozenset(
    {"Product Added", "Product Removed", "Cart Viewed", "Checkout Started", "Order Completed"}
)
_BAND_MATCH: dict[tuple[PriceBand, PriceBand], float] = {
    (a, b): 3.0 if a == b else (1.0 if {a, b} != {"low", "high"} else 0.25)
    for a in ("low", "mid", "high")
    for b in ("low", "mid", "high")
}
_EVENTS_PER_SESSION_GUESS = 9.0


@dataclass(slots=True)
class _Event:
    """A valid event under construction; ``body`` becomes the JSON value."""

    ts: int
    delivered: int
    late: bool
    user_id: str | None
    anon_id: str | None
    previous_id: str | None
    message_id: str
    body: dict[str, Any]
    seq: int


@dataclass(slots=True)
class _Step:
    """One browser event of a session body, ``offset`` ms after the session start."""

    offset: int
    kind: str
    name: str
    props: dict[str, Any]


@dataclass(slots=True)
class _VisitorState:
    """What persists between one visitor's sessions: their cart and which devices logged in."""

    customer: TrueCustomer
    hour_cum: list[float]
    cart_id: str
    cart: dict[str, tuple[int, float]] = field(default_factory=dict)
    linked: set[str] = field(default_factory=set)
    ever_logged_in: bool = False
    product_pools: dict[str, tuple[tuple[Product, ...], list[float]]] = field(default_factory=dict)
    pref_categories: list[str] = field(default_factory=list)
    pref_cum: list[float] = field(default_factory=list)


@lru_cache(maxsize=65_536)
def _minute_prefix(minute: int) -> str:
    return ms_to_iso(minute * 60_000)[:17]


def _iso(ms: int) -> str:
    """``ms_to_iso`` with the minute prefix cached: the simulator formats two per event."""
    minute, rest = divmod(ms, 60_000)
    return f"{_minute_prefix(minute)}{rest // 1000:02d}.{rest % 1000:03d}Z"


class _Generator:
    """Holds the run's rng, catalog and clock bounds; emits valid events per visitor."""

    def __init__(self, config: SimulationConfig, catalog: Catalog, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        self.products = catalog.products()
        self.by_category = catalog.by_category()
        self.bands = price_bands(catalog)
        self.start_ms = int(config.start.timestamp() * 1000)
        self.end_ms = int(config.end.timestamp() * 1000)
        self.seq = 0
        self.sessions = 0
        self._offsets: dict[tuple[str, int], int] = {}
        first_day = config.start.date() - timedelta(days=1)
        self.local_days = [first_day + timedelta(days=i) for i in range(config.days + 3)]
        self.campaigns = [
            (
                f"cmp_{d:%Y%m%d}",
                int(datetime(d.year, d.month, d.day, 8, tzinfo=UTC).timestamp()) * 1000,
            )
            for d in (config.start.date() + timedelta(days=i) for i in range(config.days))
        ]

    def visitor_state(self, customer: TrueCustomer) -> _VisitorState:
        weights = [
            w * (8.0 if h in customer.active_hours else 1.0) for h, w in enumerate(DIURNAL_WEIGHTS)
        ]
        cats = list(customer.category_prefs)
        return _VisitorState(
            customer=customer,
            hour_cum=list(accumulate(weights)),
            cart_id="cart_" + new_id(self.rng),
            pref_categories=cats,
            pref_cum=list(accumulate(customer.category_prefs[c] for c in cats)),
        )

    def _utc_offset_ms(self, tz: str, day: date) -> int:
        key = (tz, day.toordinal())
        offset = self._offsets.get(key)
        if offset is None:
            noon = datetime(day.year, day.month, day.day, 12, tzinfo=ZoneInfo(tz))
            delta = noon.utcoffset()
            offset = int(delta.total_seconds() * 1000) if delta is not None else 0
            self._offsets[key] = offset
        return offset

    def _local_to_utc_ms(self, tz: str, day: date, hour: int, minute_ms: int) -> int:
        local_midnight_ms = (day.toordinal() - 719_163) * DAY_MS  # 719163 = date(1970,1,1)
        return local_midnight_ms + hour * HOUR_MS + minute_ms - self._utc_offset_ms(tz, day)

    def session_start(self, v: _VisitorState) -> int | None:
        """A session start in the period, at an hour drawn from the visitor's local rhythm."""
        rng = self.rng
        for _ in range(20):
            day = rng.choice(self.local_days)
            hour = bisect_right(v.hour_cum, rng.random() * v.hour_cum[-1])
            ts = self._local_to_utc_ms(
                v.customer.timezone, day, min(hour, 23), rng.randrange(HOUR_MS)
            )
            if self.start_ms <= ts < self.end_ms:
                return ts
        return None

    def pick_product(self, v: _VisitorState) -> Product:
        """Mostly from preferred categories, weighted to preferred brands and price band."""
        rng = self.rng
        if rng.random() >= 0.8 or not v.pref_categories:
            return rng.choice(self.products)
        cat = v.pref_categories[
            bisect_right(v.pref_cum, rng.random() * v.pref_cum[-1]) if v.pref_cum[-1] > 0 else 0
        ]
        pool = v.product_pools.get(cat)
        if pool is None:
            products = self.by_category.get(cat, ())
            if not products:
                return rng.choice(self.products)
            c = v.customer
            weights = [
                (1.0 + 8.0 * c.brand_prefs.get(p.brand, 0.0))
                * _BAND_MATCH[(c.price_band, self.bands[p.product_id])]
                for p in products
            ]
            pool = (products, list(accumulate(weights)))
            v.product_pools[cat] = pool
        products, cum = pool
        return products[min(bisect_right(cum, rng.random() * cum[-1]), len(products) - 1)]

    def _add_probability(self, v: _VisitorState, p: Product) -> float:
        c = v.customer
        base = 0.12 if c.is_known else 0.06
        if c.category_prefs.get(p.category, 0.0) > 0.2:
            base *= 1.8
        if self.bands[p.product_id] == c.price_band:
            base *= 1.5
        if p.brand in c.brand_prefs:
            base *= 1.3
        return min(base, 0.6)

    def session_body(self, v: _VisitorState, landing: Product | None) -> list[_Step]:
        """The browser events of one session, following the shop funnel."""
        rng = self.rng
        steps: list[_Step] = []
        t = 0

        def add(
            kind: str, name: str, props: dict[str, Any], lo: int = 3_000, hi: int = 45_000
        ) -> None:
            nonlocal t
            if steps:
                t += rng.randint(lo, hi)
            steps.append(_Step(t, kind, name, props))

        def view(product: Product, position: int | None) -> None:
            props = {
                "product_id": product.product_id,
                "category": product.category,
                "brand": product.brand,
                "name": product.name,
                "price": product.price,
            }
            if position is not None:
                add("track", "Product Clicked", {**props, "position": position})
            add("track", "Product Viewed", props, 2_000, 6_000)
            path = f"/p/{product.product_id}"
            if rng.random() < 0.35:
                add(
                    "track",
                    "Scroll Depth",
                    {"depth": rng.choice((25, 50, 75, 100)), "path": path},
                    5_000,
                    40_000,
                )
            if rng.random() < 0.08:
                add(
                    "track",
                    "Video Played",
                    {"video_id": f"vid_{product.product_id}", "product_id": product.product_id},
                )
            if product.in_stock and rng.random() < self._add_probability(v, product):
                qty = 1 if rng.random() < 0.88 else 2
                add(
                    "track",
                    "Product Added",
                    {
                        "product_id": product.product_id,
                        "quantity": qty,
                        "price": product.price,
                        "cart_id": v.cart_id,
                    },
                    4_000,
                    60_000,
                )
                old_qty = v.cart.get(product.product_id, (0, 0.0))[0]
                v.cart[product.product_id] = (old_qty + qty, product.price)

        known = v.customer.is_known
        if landing is not None:
            add("page", "Product", self._page_props(f"/p/{landing.product_id}", landing.name))
            view(landing, None)
        elif rng.random() < 0.2:
            add("page", "Search", self._page_props("/search", "Search"))
        else:
            add("page", "Home", self._page_props("/", "Home"))
        mean_views = 3.0 if known else 1.8
        views = min(12, 1 + int(rng.expovariate(1.0 / (mean_views - 1.0))))
        current_category: str | None = landing.category if landing else None
        for _ in range(views if landing is None else views - 1):
            product = self.pick_product(v)
            if product.category != current_category and rng.random() < 0.7:
                add(
                    "page",
                    "Category",
                    {
                        **self._page_props(f"/c/{product.category}", product.category.title()),
                        "category": product.category,
                    },
                )
                current_category = product.category
            view(product, rng.randint(1, 48) if rng.random() < 0.45 else None)
        if v.cart and rng.random() < 0.12:
            pid = rng.choice(sorted(v.cart))
            qty, price = v.cart.pop(pid)
            add(
                "track",
                "Product Removed",
                {"product_id": pid, "quantity": qty, "price": price, "cart_id": v.cart_id},
            )
        if v.cart and rng.random() < 0.55:
            add("track", "Cart Viewed", {"cart_id": v.cart_id, "products": self._lines(v)})
            if rng.random() < 0.45:
                order_id = "ord_" + new_id(self.rng)[:18].replace("-", "")
                lines = self._lines(v)
                value = round(sum(li["price"] * li["quantity"] for li in lines), 2)
                add(
                    "track",
                    "Checkout Started",
                    {"order_id": order_id, "value": value, "currency": "EUR", "products": lines},
                )
                if rng.random() < 0.65:
                    add(
                        "track",
                        "Order Completed",
                        {
                            "order_id": order_id,
                            "revenue": value,
                            "currency": "EUR",
                            "products": lines,
                        },
                        20_000,
                        180_000,
                    )
                    v.cart.clear()
                    v.cart_id = "cart_" + new_id(rng)
        return steps

    def _lines(self, v: _VisitorState) -> list[dict[str, Any]]:
        return [
            {"product_id": pid, "quantity": qty, "price": price}
            for pid, (qty, price) in sorted(v.cart.items())
        ]

    @staticmethod
    def _page_props(path: str, title: str) -> dict[str, Any]:
        return {"path": path, "url": SHOP_URL + path, "title": f"{title} | Shop"}

    def _event(
        self,
        v: _VisitorState,
        ts: int,
        head: dict[str, Any],
        *,
        user_id: str | None,
        anon_id: str | None,
        previous_id: str | None = None,
        context: dict[str, Any],
        payload_key: str,
        payload: dict[str, Any],
    ) -> _Event:
        rng = self.rng
        late = rng.random() < self.config.late_rate
        if late:
            delivered = ts + rng.randint(5 * 60_000, 4 * HOUR_MS)
            sent = delivered - rng.randint(5, 300)
        else:
            delivered = ts + rng.randint(40, 900)
            sent = ts + (delivered - ts) // 2
        message_id = new_id(rng)
        body: dict[str, Any] = {**head, "messageId": message_id}
        if anon_id is not None:
            body["anonymousId"] = anon_id
        if previous_id is not None:
            body["previousId"] = previous_id
        if user_id is not None:
            body["userId"] = user_id
        body["timestamp"] = _iso(ts)
        body["sentAt"] = _iso(sent)
        body["context"] = context
        body[payload_key] = payload
        self.seq += 1
        return _Event(
            ts, delivered, late, user_id, anon_id, previous_id, message_id, body, self.seq
        )

    def emails(self, v: _VisitorState) -> tuple[list[_Event], list[tuple[int, Product, str]]]:
        """Email Opened/Clicked for campaigns the customer received; clicks may start sessions."""
        rng = self.rng
        c = v.customer
        events: list[_Event] = []
        triggered: list[tuple[int, Product, str]] = []
        context = {"device": {"type": "server"}, "library": LIBRARY}
        for campaign_id, sent_ms in self.campaigns:
            if rng.random() >= 0.5 or rng.random() >= 0.3:
                continue
            opened = self._open_time(v, sent_ms)
            if opened is None:
                continue
            email_id = "em_" + new_id(rng).replace("-", "")[:16]
            events.append(
                self._event(
                    v,
                    opened,
                    {"type": "track", "event": "Email Opened"},
                    user_id=c.customer_id,
                    anon_id=None,
                    context=context,
                    payload_key="properties",
                    payload={"email_id": email_id, "campaign_id": campaign_id},
                )
            )
            if rng.random() < 0.3:
                clicked = opened + rng.randint(8_000, 180_000)
                if clicked >= self.end_ms:
                    continue
                product = self.pick_product(v)
                url = (
                    f"{SHOP_URL}/p/{product.product_id}?utm_source=email&utm_campaign={campaign_id}"
                )
                events.append(
                    self._event(
                        v,
                        clicked,
                        {"type": "track", "event": "Email Clicked"},
                        user_id=c.customer_id,
                        anon_id=None,
                        context=context,
                        payload_key="properties",
                        payload={
                            "email_id": email_id,
                            "campaign_id": campaign_id,
                            "link_url": url,
                            "product_id": product.product_id,
                        },
                    )
                )
                if rng.random() < 0.7:
                    triggered.append((clicked + rng.randint(3_000, 20_000), product, campaign_id))
        return events, triggered

    def _open_time(self, v: _VisitorState, sent_ms: int) -> int | None:
        """Open soon after the send (a notification) or at the next of the customer's hours."""
        rng = self.rng
        c = v.customer
        if rng.random() < 0.2:
            ts = sent_ms + rng.randint(60_000, 90 * 60_000)
        else:
            sent_day = datetime.fromtimestamp(sent_ms / 1000, tz=ZoneInfo(c.timezone)).date()
            candidates = sorted(
                t
                for d in (sent_day, sent_day + timedelta(days=1))
                for h in c.active_hours
                if (t := self._local_to_utc_ms(c.timezone, d, h, rng.randrange(HOUR_MS))) > sent_ms
            )
            if not candidates:
                return None
            ts = candidates[0] if rng.random() < 0.6 else rng.choice(candidates)
        return ts if self.start_ms <= ts < self.end_ms else None

    def timeline(self, v: _VisitorState, sessions: int) -> list[_Event]:
        """Every valid event of one visitor, in event-time order."""
        c = v.customer
        events: list[_Event] = []
        plan: list[tuple[int, Product | None, str | None]] = []
        if c.is_known:
            email_events, triggered = self.emails(v)
            events.extend(email_events)
            plan.extend((ts, p, cmp) for ts, p, cmp in triggered)
        for _ in range(sessions):
            start = self.session_start(v)
            if start is not None:
                plan.append((start, None, None))
        plan.sort(key=lambda item: item[0])
        previous_end = -1
        for planned, landing, campaign in plan:
            device = self._device_for(c, landing is not None)
            cart, cart_id = dict(v.cart), v.cart_id
            body = self.session_body(v, landing)
            duration = body[-1].offset + 10_000
            start = max(planned, previous_end + 60_000)
            if start + duration >= self.end_ms:
                start = self.end_ms - duration - 1_000
            if start <= previous_end or start < self.start_ms:
                v.cart, v.cart_id = cart, cart_id  # the session does not fit: it never happened
                continue
            emitted = self._emit_session(v, device, body, start, campaign)
            events.extend(emitted)
            previous_end = max(e.ts for e in emitted)
            self.sessions += 1
        events.sort(key=lambda e: (e.ts, e.seq))
        return events

    def _device_for(self, c: TrueCustomer, from_email: bool) -> Device:
        if from_email:
            for d in c.devices:
                if d.type == "mobile":
                    return d
        weights = [{"mobile": 0.6, "desktop": 0.3, "tablet": 0.1}[d.type] for d in c.devices]
        return self.rng.choices(c.devices, weights)[0]

    def _emit_session(
        self,
        v: _VisitorState,
        device: Device,
        body: Sequence[_Step],
        start: int,
        campaign: str | None,
    ) -> list[_Event]:
        """Attach identities to a session body, inserting a login where the device needs one."""
        rng = self.rng
        c = v.customer
        anon = device.anonymous_id
        context: dict[str, Any] = {
            "sessionId": "s_" + new_id(rng).replace("-", "")[:20],
            "device": {"type": device.type},
            "timezone": c.timezone,
            "userAgent": device.user_agent,
            "library": LIBRARY,
        }
        if campaign is not None:
            context["campaign"] = {"name": campaign, "source": "email", "medium": "email"}
        login_at: int | None = None
        use_alias = False
        if c.is_known and (anon not in v.linked or rng.random() < 0.15):
            first_commerce = next(
                (i for i, s in enumerate(body) if s.name in _COMMERCE_EVENTS), len(body)
            )
            login_at = rng.randint(1, max(1, min(3, first_commerce, len(body))))
            use_alias = anon not in v.linked and rng.random() < 0.05
        logged_in = c.is_known and login_at is None
        events: list[_Event] = []
        for i, step in enumerate(body):
            ts = start + step.offset
            if i == login_at:
                events.extend(
                    self._login(v, device, context, start + body[i - 1].offset, ts, use_alias)
                )
                logged_in = True
            user_id = c.customer_id if logged_in else None
            if step.name == "Order Completed" and logged_in and rng.random() < 0.5:
                server_context = {"device": {"type": "server"}, "library": LIBRARY}
                events.append(
                    self._event(
                        v,
                        ts + rng.randint(300, 4_000),
                        {"type": "track", "event": step.name},
                        user_id=c.customer_id,
                        anon_id=None,
                        context=server_context,
                        payload_key="properties",
                        payload=step.props,
                    )
                )
                continue
            head = (
                {"type": "page", "name": step.name}
                if step.kind == "page"
                else {"type": "track", "event": step.name}
            )
            events.append(
                self._event(
                    v,
                    ts,
                    head,
                    user_id=user_id,
                    anon_id=anon,
                    context=context,
                    payload_key="properties",
                    payload=step.props,
                )
            )
        if login_at is not None and login_at >= len(body):
            last = start + body[-1].offset
            events.extend(
                self._login(v, device, context, last, last + rng.randint(3_000, 9_000), use_alias)
            )
        return events

    def _login(
        self,
        v: _VisitorState,
        device: Device,
        context: dict[str, Any],
        after: int,
        before: int,
        use_alias: bool,
    ) -> list[_Event]:
        """An identify (or alias) and a Logged In / Signed Up between two browser events."""
        rng = self.rng
        c = v.customer
        anon = device.anonymous_id
        gap = max(3, before - after)
        first_ever = not v.ever_logged_in
        if use_alias:
            link = self._event(
                v,
                after + gap // 3,
                {"type": "alias"},
                user_id=c.customer_id,
                anon_id=None,
                previous_id=anon,
                context=context,
                payload_key="properties",
                payload={},
            )
            del link.body["properties"]
        else:
            traits = {
                "email": c.email,
                "firstName": c.first_name,
                "lastName": c.last_name,
                "timezone": c.timezone,
            }
            link = self._event(
                v,
                after + gap // 3,
                {"type": "identify"},
                user_id=c.customer_id,
                anon_id=anon,
                context=context,
                payload_key="traits",
                payload=traits,
            )
        if first_ever and rng.random() < 0.3:
            name, method = "Signed Up", "email"
        else:
            name = "Logged In"
            method = rng.choice(("password", "password", "google", "apple", "magic_link"))
        track = self._event(
            v,
            after + 2 * gap // 3,
            {"type": "track", "event": name},
            user_id=c.customer_id,
            anon_id=anon,
            context=context,
            payload_key="properties",
            payload={"method": method},
        )
        v.linked.add(anon)
        v.ever_logged_in = True
        return [link, track]


def _poisson(rng: random.Random, lam: float) -> int:
    """A Poisson draw (Knuth below 30, a rounded normal above)."""
    if lam <= 0:
        return 0
    if lam > 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit = math.exp(-lam)
    k, p = 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _safe_cut(events: Sequence[_Event], keep_at_least: int, known: bool) -> int:
    """The shortest prefix length >= ``keep_at_least`` that leaves no device mid-login.

    Cutting a known customer between a device's first anonymous event and its login would
    leave that device unlinkable, so such cut points are skipped.
    """
    if not known:
        return keep_at_least
    linked: set[str] = set()
    pending: set[str] = set()
    for i, e in enumerate(events):
        if i >= keep_at_least and not pending:
            return i
        if e.user_id is None and e.anon_id is not None and e.anon_id not in linked:
            pending.add(e.anon_id)
        link = e.previous_id if e.previous_id is not None else e.anon_id
        if e.user_id is not None and link is not None:
            linked.add(link)
            pending.discard(link)
    return len(events)


def _message_counts(config: SimulationConfig) -> tuple[int, int, int]:
    """(valid, duplicate, malformed) counts that add up to ``config.events``."""
    n = config.events
    malformed = min(n - 1, round(n * config.malformed_rate))
    duplicates = min(round(n * config.duplicate_rate), (n - malformed) // 2)
    return n - malformed - duplicates, duplicates, malformed


def simulate(config: SimulationConfig, catalog: Catalog) -> Simulation:
    """Simulate ``config.events`` raw messages of fashion-retail traffic, in delivery order."""
    if len(catalog) == 0:
        raise ValueError("the catalog is empty")
    rng = random.Random(config.seed)
    gen = _Generator(config, catalog, rng)
    n_valid, n_duplicates, n_malformed = _message_counts(config)
    customers = _population(gen, config)
    timelines = _timelines(gen, customers, n_valid)

    valid = [e for events in timelines.values() for e in events]
    valid.sort(key=lambda e: (e.delivered, e.seq))
    pending: list[tuple[int, int, RawMessage | _Event]] = [(e.delivered, e.seq, e) for e in valid]
    duplicated = [valid[i] for i in rng.sample(range(len(valid)), n_duplicates)]
    for original in duplicated:
        gen.seq += 1
        pending.append((original.delivered + rng.randint(300, 600_000), gen.seq, original))
    active = [customers[i] for i, events in timelines.items() if events] or customers
    malformed = malformed_messages(
        rng, active, n_malformed, products=gen.products, start_ms=gen.start_ms, end_ms=gen.end_ms
    )
    for message in malformed:
        gen.seq += 1
        pending.append((message.delivered_ms, gen.seq, message))
    pending.sort(key=lambda item: (item[0], item[1]))

    links = _identity_links(valid)
    messages: list[RawMessage] = []
    counts: Counter[str] = Counter()
    values: dict[str, bytes] = {}
    for delivered, _, item in pending:
        if isinstance(item, RawMessage):
            messages.append(item)
            continue
        true_id = _true_customer_id(item, links)
        value = values.get(item.message_id)
        is_duplicate = value is not None
        if value is None:
            value = values[item.message_id] = orjson.dumps(item.body)
            counts[true_id] += 1
        key_id = partition_key(item.body)
        messages.append(
            RawMessage(
                key=key_id.encode() if key_id is not None else None,
                value=value,
                kind="duplicate" if is_duplicate else "valid",
                message_id=item.message_id,
                true_customer_id=true_id,
                malformed_reason=None,
                timestamp_ms=item.ts,
                delivered_ms=delivered,
                late=item.late and not is_duplicate,
            )
        )
    reasons = Counter(m.malformed_reason for m in malformed if m.malformed_reason is not None)
    truth = GroundTruth(
        identity_links=links,
        duplicates=frozenset(e.message_id for e in duplicated),
        expected_event_counts=dict(sorted(counts.items())),
        malformed_by_reason=dict(sorted(reasons.items())),
        preferences={c.customer_id: c.preferences for c in customers},
        late_message_ids=frozenset(e.message_id for e in valid if e.late),
        product_price_bands=gen.bands,
    )
    orders = [e for e in valid if e.body.get("event") == "Order Completed"]
    return Simulation(
        config=config,
        messages=messages,
        customers=customers,
        ground_truth=truth,
        sessions=len({e.body["context"].get("sessionId") for e in valid} - {None}),
        orders=len(orders),
        revenue=sum(e.body["properties"]["revenue"] for e in orders),
    )


def _population(gen: _Generator, config: SimulationConfig) -> list[TrueCustomer]:
    """The planned visitors: known customers first, then those who never log in."""
    categories = sorted(gen.by_category)
    brands = sorted({p.brand for p in gen.products})
    n_known = config.known_customers
    share = config.anonymous_visitor_share
    n_anonymous = round(n_known * share / (1.0 - share))
    return [
        make_visitor(gen.rng, i + 1, known=True, categories=categories, brands=brands)
        for i in range(n_known)
    ] + [
        make_visitor(gen.rng, 0, known=False, categories=categories, brands=brands)
        for _ in range(n_anonymous)
    ]


def _timelines(
    gen: _Generator, customers: list[TrueCustomer], n_valid: int
) -> dict[int, list[_Event]]:
    """Exactly ``n_valid`` valid events, as per-visitor timelines keyed by index in ``customers``.

    Visitors are visited in random order, each given a share of the still-missing events in
    proportion to their activity, so the total lands near the target without thinning the
    period; a shortfall adds new visitors (appended to ``customers``), an excess is trimmed.
    """
    rng = gen.rng
    timelines: dict[int, list[_Event]] = {}
    order = list(range(len(customers)))
    rng.shuffle(order)
    remaining_activity = sum(c.activity for c in customers)
    generated = 0

    def per_session() -> float:
        return generated / gen.sessions if gen.sessions >= 20 else _EVENTS_PER_SESSION_GUESS

    for position, index in enumerate(order):
        customer = customers[index]
        remaining = n_valid - generated
        if remaining <= 0:
            break
        lam = remaining * customer.activity / remaining_activity / per_session()
        remaining_activity -= customer.activity
        if position == len(order) - 1:
            lam = remaining / per_session()
        timelines[index] = gen.timeline(gen.visitor_state(customer), _poisson(rng, lam))
        generated += len(timelines[index])
    categories = sorted(gen.by_category)
    brands = sorted({p.brand for p in gen.products})
    known = gen.config.anonymous_visitor_share == 0.0
    while generated < n_valid:
        number = sum(1 for c in customers if c.is_known) + 1
        customer = make_visitor(rng, number, known=known, categories=categories, brands=brands)
        index = len(customers)
        customers.append(customer)
        sessions = min(40, max(1, round((n_valid - generated) / per_session())))
        timelines[index] = gen.timeline(gen.visitor_state(customer), sessions)
        generated += len(timelines[index])
    _trim(timelines, customers, generated - n_valid)
    return timelines


def _trim(timelines: dict[int, list[_Event]], customers: list[TrueCustomer], excess: int) -> None:
    """Drop ``excess`` events from the ends of the last-generated timelines, at safe cut points."""
    for index in reversed(list(timelines)):
        if excess <= 0:
            return
        events = timelines[index]
        keep = _safe_cut(events, max(0, len(events) - excess), customers[index].is_known)
        excess -= len(events) - keep
        del events[keep:]
    for index in reversed(list(timelines)):
        if excess <= 0:
            return
        events = timelines[index]
        # No safe cut was left: cut anyway; the truth below is recomputed from what is emitted.
        keep = max(0, len(events) - excess)
        excess -= len(events) - keep
        del events[keep:]


def _identity_links(valid: Sequence[_Event]) -> dict[str, str]:
    """anonymousId -> userId for every device some emitted valid message ties to a customer."""
    links: dict[str, str] = {}
    for e in valid:
        if e.user_id is None:
            continue
        anon = e.previous_id if e.previous_id is not None else e.anon_id
        if anon is not None:
            links.setdefault(anon, e.user_id)
    return dict(sorted(links.items()))


def _true_customer_id(e: _Event, links: dict[str, str]) -> str:
    if e.user_id is not None:
        return e.user_id
    assert e.anon_id is not None, "valid events always carry an identity"
    return links.get(e.anon_id, ANONYMOUS_PREFIX + e.anon_id)
