"""The embedded default stores: one SQLite file in WAL mode holding the local warehouse
(clean events, profiles, dead letters, identity links) and serving the profile store.

WAL lets notebooks and the workbench read from other processes while the processor writes,
without lock errors. Every write is idempotent: events insert once per ``message_id``
(an anonymous attribution is upgraded to the known customer when history is merged),
profiles upsert on ``customer_id`` keeping the highest ``version``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pandas as pd

from pipeline.errors import ProfileNotFoundError, StoreError

SCHEMA_VERSION = 1

_DDL = """
CREATE TABLE IF NOT EXISTS events (
    message_id   TEXT PRIMARY KEY,
    customer_id  TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    event_name   TEXT NOT NULL,
    event_ts_ms  INTEGER NOT NULL,
    event_date   TEXT NOT NULL,
    anonymous_id TEXT,
    user_id      TEXT,
    session_id   TEXT,
    device_type  TEXT,
    product_id   TEXT,
    category     TEXT,
    brand        TEXT,
    price        REAL,
    revenue      REAL,
    merged_from  TEXT,
    ingested_ms  INTEGER NOT NULL,
    stored_ms    INTEGER NOT NULL,
    payload      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_customer ON events (customer_id, event_ts_ms);
CREATE INDEX IF NOT EXISTS events_date ON events (event_date);
CREATE TABLE IF NOT EXISTS profiles (
    customer_id   TEXT PRIMARY KEY,
    is_anonymous  INTEGER NOT NULL,
    merged_into   TEXT,
    event_count   INTEGER NOT NULL,
    cis           REAL NOT NULL,
    intent_stage  TEXT NOT NULL,
    revenue_total REAL NOT NULL,
    order_count   INTEGER NOT NULL,
    last_seen_ms  INTEGER,
    version       INTEGER NOT NULL,
    updated_ms    INTEGER NOT NULL,
    stored_ms     INTEGER NOT NULL,
    profile       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS profiles_cis ON profiles (cis DESC);
CREATE TABLE IF NOT EXISTS dead_letters (
    dead_letter_id TEXT PRIMARY KEY,
    reason         TEXT NOT NULL,
    detail         TEXT NOT NULL,
    schema_path    TEXT,
    message_id     TEXT,
    event_name     TEXT,
    message_key    TEXT,
    ingested_ms    INTEGER NOT NULL,
    failed_ms      INTEGER NOT NULL,
    stored_ms      INTEGER NOT NULL,
    raw_text       TEXT NOT NULL,
    raw_b64        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_reason ON dead_letters (reason);
CREATE TABLE IF NOT EXISTS identity_links (
    anonymous_id   TEXT PRIMARY KEY,
    customer_id    TEXT NOT NULL,
    previous_customer_id TEXT,
    linked_ms      INTEGER NOT NULL,
    via_message_id TEXT NOT NULL,
    merged_events  INTEGER NOT NULL,
    stored_ms      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_UPSERT_EVENT = """
INSERT INTO events VALUES (:message_id, :customer_id, :event_type, :event_name, :event_ts_ms,
    :event_date, :anonymous_id, :user_id, :session_id, :device_type, :product_id, :category,
    :brand, :price, :revenue, :merged_from, :ingested_ms, :stored_ms, :payload)
ON CONFLICT (message_id) DO UPDATE SET
    customer_id = excluded.customer_id,
    merged_from = excluded.merged_from,
    payload = excluded.payload
WHERE events.customer_id LIKE 'anon:%' AND excluded.customer_id NOT LIKE 'anon:%'
"""

_UPSERT_PROFILE = """
INSERT INTO profiles VALUES (:customer_id, :is_anonymous, :merged_into, :event_count, :cis,
    :intent_stage, :revenue_total, :order_count, :last_seen_ms, :version, :updated_ms,
    :stored_ms, :profile)
ON CONFLICT (customer_id) DO UPDATE SET
    is_anonymous = excluded.is_anonymous, merged_into = excluded.merged_into,
    event_count = excluded.event_count, cis = excluded.cis, intent_stage = excluded.intent_stage,
    revenue_total = excluded.revenue_total, order_count = excluded.order_count,
    last_seen_ms = excluded.last_seen_ms, version = excluded.version,
    updated_ms = excluded.updated_ms, stored_ms = excluded.stored_ms, profile = excluded.profile
WHERE excluded.version >= profiles.version
"""

_INSERT_DEAD_LETTER = """
INSERT OR IGNORE INTO dead_letters VALUES (:dead_letter_id, :reason, :detail, :schema_path,
    :message_id, :event_name, :message_key, :ingested_ms, :failed_ms, :stored_ms, :raw_text,
    :raw_b64)
"""

_UPSERT_LINK = """
INSERT INTO identity_links VALUES (:anonymous_id, :customer_id, :previous_customer_id,
    :linked_ms, :via_message_id, :merged_events, :stored_ms)
ON CONFLICT (anonymous_id) DO UPDATE SET
    customer_id = excluded.customer_id, previous_customer_id = excluded.previous_customer_id,
    linked_ms = excluded.linked_ms, via_message_id = excluded.via_message_id,
    merged_events = excluded.merged_events, stored_ms = excluded.stored_ms
WHERE excluded.linked_ms >= identity_links.linked_ms
"""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _day(ms: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ms / 1000))


class LocalWarehouse:
    """SQLite warehouse and profile store; safe to open from several processes at once."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._lock = threading.Lock()
        try:
            if read_only:
                if not self.path.exists():
                    raise StoreError(
                        f"no warehouse at {self.path}: run `pipeline demo` or `pipeline up`"
                    )
                self._conn = sqlite3.connect(
                    f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, timeout=30
                )
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
                self._conn.executescript(_DDL)
                self._conn.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                self._conn.commit()
            self._conn.execute("PRAGMA busy_timeout=30000")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open warehouse {self.path}: {exc}") from exc

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> LocalWarehouse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                with self._conn:
                    yield self._conn
            except sqlite3.Error as exc:
                raise StoreError(f"write to {self.path} failed: {exc}") from exc

    def write_events(self, events: Sequence[Mapping[str, Any]]) -> int:
        """Insert clean events once per message_id; returns the time they became readable (ms)."""
        stored = _now_ms()
        rows = [
            {
                "message_id": e["message_id"],
                "customer_id": e["customer_id"],
                "event_type": e["type"],
                "event_name": e["name"],
                "event_ts_ms": e["timestamp_ms"],
                "event_date": _day(e["timestamp_ms"]),
                "anonymous_id": e.get("anonymous_id"),
                "user_id": e.get("user_id"),
                "session_id": e.get("session_id"),
                "device_type": e.get("device_type"),
                "product_id": e.get("product_id"),
                "category": e.get("category"),
                "brand": e.get("brand"),
                "price": e.get("price"),
                "revenue": e.get("revenue"),
                "merged_from": e.get("merged_from"),
                "ingested_ms": e["ingested_ms"],
                "stored_ms": stored,
                "payload": orjson.dumps(e).decode(),
            }
            for e in events
        ]
        with self._tx() as conn:
            conn.executemany(_UPSERT_EVENT, rows)
        return stored

    def write_profiles(self, profiles: Iterable[Mapping[str, Any]]) -> int:
        """Upsert profiles on customer_id; an older version never overwrites a newer one."""
        stored = _now_ms()
        latest: dict[str, Mapping[str, Any]] = {}
        for p in profiles:
            cur = latest.get(p["customer_id"])
            if cur is None or p["version"] >= cur["version"]:
                latest[p["customer_id"]] = p
        rows = [
            {
                "customer_id": p["customer_id"],
                "is_anonymous": int(bool(p["is_anonymous"])),
                "merged_into": p.get("merged_into"),
                "event_count": p["event_count"],
                "cis": p["cis"],
                "intent_stage": p["intent_stage"],
                "revenue_total": p["revenue_total"],
                "order_count": p["order_count"],
                "last_seen_ms": p.get("last_seen_ms"),
                "version": p["version"],
                "updated_ms": p["updated_ms"],
                "stored_ms": stored,
                "profile": orjson.dumps(p).decode(),
            }
            for p in latest.values()
        ]
        with self._tx() as conn:
            conn.executemany(_UPSERT_PROFILE, rows)
        return stored

    def write_dead_letters(self, failures: Sequence[Mapping[str, Any]]) -> int:
        """Insert dead letters once per input position (topic:partition:offset)."""
        stored = _now_ms()
        rows = [
            {
                "dead_letter_id": f"{f['topic']}:{f['partition']}:{f['offset']}",
                "reason": f["reason"],
                "detail": f["detail"],
                "schema_path": f.get("schema_path"),
                "message_id": f.get("message_id"),
                "event_name": f.get("event_name"),
                "message_key": f.get("key"),
                "ingested_ms": f["ingested_ms"],
                "failed_ms": f["failed_ms"],
                "stored_ms": stored,
                "raw_text": f["raw_text"],
                "raw_b64": f["raw_b64"],
            }
            for f in failures
        ]
        with self._tx() as conn:
            conn.executemany(_INSERT_DEAD_LETTER, rows)
        return stored

    def write_identity_links(self, links: Sequence[Mapping[str, Any]]) -> int:
        """Upsert anonymousId → customer links with their provenance (latest link wins)."""
        stored = _now_ms()
        rows = [{**link, "stored_ms": stored} for link in links]
        with self._tx() as conn:
            conn.executemany(_UPSERT_LINK, rows)
        return stored

    def get_profile(self, customer_id: str) -> dict[str, Any]:
        """The stored profile of one customer, following a merged anonymous profile to its owner."""
        for _ in range(3):
            row = self._conn.execute(
                "SELECT profile, merged_into FROM profiles WHERE customer_id = ?", (customer_id,)
            ).fetchone()
            if row is None:
                break
            if row[1] is None:
                result: dict[str, Any] = orjson.loads(row[0])
                return result
            customer_id = row[1]
        raise ProfileNotFoundError(f"no profile for customer {customer_id!r}")

    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> pd.DataFrame:
        """Run a read query and return a DataFrame."""
        try:
            cur = self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise StoreError(f"query failed on {self.path}: {exc}") from exc
        cols = [d[0] for d in cur.description or ()]
        return pd.DataFrame.from_records(cur.fetchall(), columns=cols)

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run a query returning one value."""
        row = self._conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    def counts(self) -> dict[str, int]:
        """Row counts of every table (for summaries and health checks)."""
        return {
            t: int(self.scalar(f"SELECT COUNT(*) FROM {t}"))
            for t in ("events", "profiles", "dead_letters", "identity_links")
        }
