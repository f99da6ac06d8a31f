"""The embedded default stores: one SQLite file in WAL mode holding the local warehouse
(clean events, profiles, dead letters, identity links, alerts) and the profile store.

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
from typing import Any, Protocol

import orjson
import pandas as pd

from pipeline.errors import ProfileNotFoundError, StoreError
from pipeline.identity import ANON_PREFIX
from pipeline.stores.rows import (
    LINEAGE_COLUMNS,
    alert_row,
    dead_letter_row,
    event_row,
    profile_row,
    sent_email_row,
)

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
    payload      TEXT NOT NULL,
    collected_ms INTEGER,
    parsed_ms    INTEGER,
    stitched_ms  INTEGER,
    scored_ms    INTEGER
);
CREATE INDEX IF NOT EXISTS events_customer ON events (customer_id, event_ts_ms);
CREATE INDEX IF NOT EXISTS events_date ON events (event_date);
-- the Live page's recent windows (by store and broker time) and re-attributed count; cheap to
-- keep: both times only grow, so inserts append (60k events: 18-19 vs 19-20 us each)
CREATE INDEX IF NOT EXISTS events_stored ON events (stored_ms);
CREATE INDEX IF NOT EXISTS events_ingested ON events (ingested_ms);
CREATE INDEX IF NOT EXISTS events_merged ON events (merged_from) WHERE merged_from IS NOT NULL;
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
CREATE INDEX IF NOT EXISTS profiles_stored ON profiles (stored_ms);
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
CREATE INDEX IF NOT EXISTS dead_letters_failed ON dead_letters (failed_ms);
CREATE TABLE IF NOT EXISTS identity_links (
    anonymous_id   TEXT PRIMARY KEY,
    customer_id    TEXT NOT NULL,
    previous_customer_id TEXT,
    linked_ms      INTEGER NOT NULL,
    via_message_id TEXT NOT NULL,
    merged_events  INTEGER NOT NULL,
    stored_ms      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS segment_changes (
    customer_id     TEXT NOT NULL,
    segment         TEXT NOT NULL,
    change          TEXT NOT NULL,
    at_ms           INTEGER NOT NULL,
    profile_version INTEGER NOT NULL,
    stored_ms       INTEGER NOT NULL,
    PRIMARY KEY (customer_id, profile_version, segment)
);
CREATE INDEX IF NOT EXISTS segment_changes_segment ON segment_changes (segment, at_ms);
CREATE TABLE IF NOT EXISTS email_triggers (
    trigger_id   TEXT PRIMARY KEY,
    customer_id  TEXT NOT NULL,
    trigger      TEXT NOT NULL,
    due_ms       INTEGER NOT NULL,
    emitted_ms   INTEGER NOT NULL,
    context      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sent_emails (
    email_id     TEXT PRIMARY KEY,
    customer_id  TEXT NOT NULL,
    campaign_id  TEXT NOT NULL,
    subject      TEXT NOT NULL,
    email_sha256 TEXT,
    sent_ms      INTEGER NOT NULL,
    sent_date    TEXT NOT NULL,
    stored_ms    INTEGER NOT NULL,
    html         TEXT NOT NULL,
    text         TEXT NOT NULL,
    snapshot     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sent_emails_customer ON sent_emails (customer_id, sent_ms);
CREATE TABLE IF NOT EXISTS alerts (
    alert_id         TEXT PRIMARY KEY,
    kind             TEXT NOT NULL,
    subject          TEXT NOT NULL,
    severity         TEXT NOT NULL,
    observed         REAL NOT NULL,
    expected         REAL NOT NULL,
    at_ms            INTEGER NOT NULL,
    source_partition INTEGER,
    stored_ms        INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_at ON alerts (at_ms);
CREATE TABLE IF NOT EXISTS scheduled_emails (
    email_id     TEXT PRIMARY KEY,
    customer_id  TEXT NOT NULL,
    campaign_id  TEXT NOT NULL,
    send_at_ms   INTEGER NOT NULL,
    scheduled_ms INTEGER NOT NULL,
    subject      TEXT NOT NULL,
    html         TEXT NOT NULL,
    text         TEXT NOT NULL,
    snapshot     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS replica_positions (
    topic       TEXT NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
);
CREATE TABLE IF NOT EXISTS replica_topics (topic TEXT PRIMARY KEY, topic_id TEXT NOT NULL);
"""


def _anonymous(column: str) -> str:
    """SQL: ``column`` names an anonymous profile. A prefix compared as text, not ``LIKE``,
    which is case-insensitive in SQLite: 'Anon:Smith' is a known customer's id."""
    return f"substr({column}, 1, {len(ANON_PREFIX)}) = '{ANON_PREFIX}'"


# An event stored twice (anonymous, then re-attributed to its customer at a login: the two
# records travel on different partitions, so a copy may apply either first) ends the same in
# every copy: the known customer's attribution, and the earliest time of each lineage step
# (its first arrival's path, not the re-attribution's).
_PROMOTE = f"({_anonymous('events.customer_id')} AND NOT {_anonymous('excluded.customer_id')})"


def _earliest(column: str) -> str:
    return (
        f"{column} = min(coalesce(events.{column}, excluded.{column}), "
        f"coalesce(excluded.{column}, events.{column}))"
    )


def _earlier(column: str) -> str:
    return (
        f"excluded.{column} < events.{column} "
        f"OR (events.{column} IS NULL AND excluded.{column} IS NOT NULL)"
    )


_UPSERT_EVENT = f"""
INSERT INTO events VALUES (:message_id, :customer_id, :event_type, :event_name, :event_ts_ms,
    :event_date, :anonymous_id, :user_id, :session_id, :device_type, :product_id, :category,
    :brand, :price, :revenue, :merged_from, :ingested_ms, :stored_ms, :payload, :collected_ms,
    :parsed_ms, :stitched_ms, :scored_ms)
ON CONFLICT (message_id) DO UPDATE SET
    customer_id = CASE WHEN {_PROMOTE} THEN excluded.customer_id ELSE events.customer_id END,
    merged_from = CASE WHEN {_PROMOTE} THEN excluded.merged_from ELSE events.merged_from END,
    payload = CASE WHEN {_PROMOTE} THEN excluded.payload ELSE events.payload END,
    {", ".join(_earliest(c) for c in LINEAGE_COLUMNS)}
WHERE {_PROMOTE} OR {" OR ".join(_earlier(c) for c in LINEAGE_COLUMNS)}
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

_INSERT_ALERT = """
INSERT OR IGNORE INTO alerts VALUES (:alert_id, :kind, :subject, :severity, :observed,
    :expected, :at_ms, :source_partition, :stored_ms)
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


_RETENTION_COLUMNS = frozenset(
    {("events", "event_ts_ms"), ("dead_letters", "failed_ms"), ("sent_emails", "sent_ms")}
)


class WarehouseWriter(Protocol):
    """What the processor's sinks write to: the local warehouse, BigQuery."""

    def write_events(self, events: Sequence[Mapping[str, Any]]) -> int: ...
    def write_profiles(self, profiles: Iterable[Mapping[str, Any]]) -> int: ...
    def write_dead_letters(self, failures: Sequence[Mapping[str, Any]]) -> int: ...
    def write_identity_links(self, links: Sequence[Mapping[str, Any]]) -> int: ...
    def write_segment_changes(self, changes: Sequence[Mapping[str, Any]]) -> int: ...
    def write_alerts(self, alerts: Sequence[Mapping[str, Any]]) -> int: ...


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _read_only_uri(path: Path) -> str:
    """SQLite's URI opening ``path`` read-only. Percent-encoded: in a plain ``file:`` URI a
    '#' or '?' in the path ends it and '%' starts an escape, which opens another file."""
    return Path(path).resolve().as_uri() + "?mode=ro"


# The fields of a dead letter's raw JSON that name whom it is about, for `forget` (here and in
# a serving replica): Segment's, and the snake_case ones of CRM records and control messages.
DEAD_LETTER_IDS = ("userId", "customer_id", "user_id")
"""Fields holding a customer's id."""
DEAD_LETTER_DEVICES = ("anonymousId", "previousId", "anonymous_id")
"""Fields holding a device's id (its anonymous profile is ``anon:`` + the id)."""

_SCHEDULED_COLUMNS = (
    "email_id",
    "customer_id",
    "campaign_id",
    "send_at_ms",
    "subject",
    "html",
    "text",
)

# Columns added after a table's first release: (table, column, SQL type); always nullable.
_ADDED_COLUMNS = (
    ("events", "collected_ms", "INTEGER"),
    ("events", "parsed_ms", "INTEGER"),
    ("events", "stitched_ms", "INTEGER"),
    ("events", "scored_ms", "INTEGER"),
)


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Additive migration: give a warehouse made by an older release the newer columns."""
    for table, column, sql_type in _ADDED_COLUMNS:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")


class LocalWarehouse:
    """SQLite warehouse and profile store; safe to open from several processes at once."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._lock = threading.RLock()
        self._depth = 0  # open write transactions on this connection (batch() nests writes)
        try:
            if read_only:
                if not self.path.exists():
                    raise StoreError(
                        f"no warehouse at {self.path}: run `pipeline demo` or `pipeline up`"
                    )
                self._conn = sqlite3.connect(
                    _read_only_uri(self.path), uri=True, check_same_thread=False, timeout=30
                )
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
                # One transaction: a reader opening the store meanwhile sees no tables or all
                # of them, never half a schema.
                self._conn.executescript("BEGIN IMMEDIATE;" + _DDL)
                _add_missing_columns(self._conn)
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
    def batch(self) -> Iterator[None]:
        """Make the writes inside one transaction: a sink flush commits once, not per table."""
        with self._tx():
            yield

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._depth:  # inside batch(): the outer transaction commits or rolls back
                yield self._conn
                return
            self._depth += 1
            try:
                with self._conn:
                    yield self._conn
            except sqlite3.Error as exc:
                raise StoreError(f"write to {self.path} failed: {exc}") from exc
            finally:
                self._depth -= 1

    def write_events(self, events: Sequence[Mapping[str, Any]]) -> int:
        """Insert clean events once per message_id; returns the time they became readable (ms)."""
        stored = _now_ms()
        rows = [event_row(e, stored) for e in events]
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
        rows = [profile_row(p, stored) for p in latest.values()]
        with self._tx() as conn:
            conn.executemany(_UPSERT_PROFILE, rows)
        return stored

    def write_dead_letters(self, failures: Sequence[Mapping[str, Any]]) -> int:
        """Insert dead letters once per input position (topic:partition:offset)."""
        stored = _now_ms()
        rows = [dead_letter_row(f, stored) for f in failures]
        with self._tx() as conn:
            conn.executemany(_INSERT_DEAD_LETTER, rows)
        return stored

    def write_alerts(self, alerts: Sequence[Mapping[str, Any]]) -> int:
        """Insert anomaly alerts once per alert_id (kind, subject and time: replays add none)."""
        stored = _now_ms()
        rows = [alert_row(a, stored) for a in alerts]
        with self._tx() as conn:
            conn.executemany(_INSERT_ALERT, rows)
        return stored

    def write_identity_links(self, links: Sequence[Mapping[str, Any]]) -> int:
        """Upsert anonymousId → customer links with their provenance (latest link wins)."""
        stored = _now_ms()
        rows = [{**link, "stored_ms": stored} for link in links]
        with self._tx() as conn:
            conn.executemany(_UPSERT_LINK, rows)
        return stored

    def write_segment_changes(self, changes: Sequence[Mapping[str, Any]]) -> int:
        """Insert segment enter/exit records once per (customer, profile version, segment)."""
        stored = _now_ms()
        rows = [
            (c["customer_id"], c["segment"], c["change"], c["at_ms"], c["profile_version"], stored)
            for c in changes
        ]
        with self._tx() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO segment_changes VALUES (?, ?, ?, ?, ?, ?)", rows
            )
        return stored

    def write_triggers(self, triggers: Sequence[Mapping[str, Any]]) -> list[str]:
        """Record emitted triggers once per trigger_id; returns the ids that were new."""
        stored = _now_ms()
        new: list[str] = []
        with self._tx() as conn:
            for t in triggers:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO email_triggers VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        t["trigger_id"],
                        t["customer_id"],
                        t["trigger"],
                        t["due_ms"],
                        stored,
                        orjson.dumps(t.get("context", {})).decode(),
                    ),
                )
                if cur.rowcount:
                    new.append(t["trigger_id"])
        return new

    def get_profile(self, customer_id: str) -> dict[str, Any]:
        """The stored profile of one customer, following a merged anonymous profile to its owner."""
        for _ in range(3):
            row = self._read(
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
        cur = self._read(sql, params)
        cols = [d[0] for d in cur.description or ()]
        return pd.DataFrame.from_records(cur.fetchall(), columns=cols)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> Iterator[tuple[Any, ...]]:
        """Run a read query and yield its rows as tuples, fetched in batches: for scans too
        large to hold twice (every profile), where :meth:`query` builds a DataFrame."""
        cur = self._read(sql, params)
        while True:
            try:
                batch = cur.fetchmany(1_000)
            except sqlite3.Error as exc:
                raise StoreError(f"query failed on {self.path}: {exc}") from exc
            if not batch:
                return
            yield from batch

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run a query returning one value."""
        row = self._read(sql, params).fetchone()
        return None if row is None else row[0]

    def _read(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> sqlite3.Cursor:
        """Execute a read; SQLite's errors (a store still being created, locked, corrupt)
        become a StoreError naming the store, which servers answer as unavailable."""
        try:
            return self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise StoreError(f"query failed on {self.path}: {exc}") from exc

    def counts(self) -> dict[str, int]:
        """Row counts of every table (for summaries and health checks); 0 for a table an older
        store opened read-only does not have yet (a writer adds it on opening)."""
        tables = (
            "events",
            "profiles",
            "dead_letters",
            "identity_links",
            "segment_changes",
            "email_triggers",
        )
        have = set(self.query("SELECT name FROM sqlite_master WHERE type = 'table'")["name"])
        return {
            t: int(self.scalar(f"SELECT COUNT(*) FROM {t}")) if t in have else 0 for t in tables
        }

    def replica_positions(self) -> dict[tuple[str, int], int]:
        """Where a serving replica kept from the topics (:mod:`pipeline.stores.follow`) goes
        on reading: the next offset per (topic, partition) whose records are applied."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT topic, partition, next_offset FROM replica_positions"
            ).fetchall()
        return {(str(t), int(p)): int(o) for t, p, o in rows}

    def save_replica_positions(self, positions: Mapping[tuple[str, int], int]) -> None:
        """Record that the records before these offsets are applied (never moves one back)."""
        rows = [(t, p, o) for (t, p), o in positions.items()]
        with self._tx() as conn:
            conn.executemany(
                "INSERT INTO replica_positions VALUES (?, ?, ?) "
                "ON CONFLICT (topic, partition) DO UPDATE SET "
                "next_offset = MAX(next_offset, excluded.next_offset)",
                rows,
            )

    def restart_replica_topics(
        self, topics: Iterable[str], *, tables: Mapping[str, str] | None = None
    ) -> None:
        """Read these topics from their start again (they were recreated): their saved
        positions go, and so do the rows of their tables in ``tables`` (topic -> table), which
        came from topics that no longer exist; in one transaction."""
        with self._tx() as conn:
            self._restart(conn, topics, tables or {})

    @staticmethod
    def _restart(
        conn: sqlite3.Connection, topics: Iterable[str], tables: Mapping[str, str]
    ) -> None:
        for topic in topics:
            conn.execute("DELETE FROM replica_positions WHERE topic = ?", (topic,))
            if topic in tables:
                conn.execute(f"DELETE FROM {tables[topic]}")

    def snapshot(self, dest: Path) -> Path:
        """Write a consistent copy of this store to ``dest`` (SQLite's ``VACUUM INTO``: one read
        transaction, so a replica's rows and its saved positions agree), replacing ``dest``
        only once the copy is whole; returns ``dest``."""
        dest = Path(dest)
        if dest.is_dir():
            raise StoreError(f"snapshot: {dest} is a directory; name the file to write")
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f".{dest.name}.partial")
        partial.unlink(missing_ok=True)
        with self._lock:
            try:
                self._conn.execute("VACUUM INTO ?", (str(partial),))
            except sqlite3.Error as exc:
                partial.unlink(missing_ok=True)
                raise StoreError(f"snapshot of {self.path} to {dest} failed: {exc}") from exc
        partial.replace(dest)
        return dest

    def replica_topic_ids(self) -> dict[str, str]:
        """The broker's id of each topic the saved positions are in (Kafka's topic ids tell a
        topic recreated under the same name from the one the positions were read in)."""
        with self._lock:
            rows = self._conn.execute("SELECT topic, topic_id FROM replica_topics").fetchall()
        return {str(t): str(i) for t, i in rows}

    def adopt_replica_topics(
        self, ids: Mapping[str, str], *, tables: Mapping[str, str] | None = None
    ) -> list[str]:
        """Make ``ids`` the topics' ids; returns the topics whose id changed (recreated under
        the same name), which are restarted as by :meth:`restart_replica_topics` in the same
        transaction."""
        with self._tx() as conn:
            known = dict(conn.execute("SELECT topic, topic_id FROM replica_topics").fetchall())
            recreated = [t for t, topic_id in ids.items() if known.get(t, topic_id) != topic_id]
            self._restart(conn, recreated, tables or {})
            conn.executemany(
                "INSERT INTO replica_topics VALUES (?, ?) "
                "ON CONFLICT (topic) DO UPDATE SET topic_id = excluded.topic_id",
                list(ids.items()),
            )
        return recreated

    def write_sent_emails(self, emails: Sequence[Mapping[str, Any]]) -> int:
        """Insert sent e-mails once per email_id (the address only as its SHA-256)."""
        stored = _now_ms()
        rows = [sent_email_row(m, stored) for m in emails]
        with self._tx() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO sent_emails VALUES (:email_id, :customer_id, :campaign_id,"
                " :subject, :email_sha256, :sent_ms, :sent_date, :stored_ms, :html, :text,"
                " :snapshot)",
                rows,
            )
        return stored

    def write_scheduled_emails(self, emails: Sequence[Mapping[str, Any]]) -> int:
        """Keep rendered e-mails waiting for their send time (no address: it is looked up
        again when they are sent), once per email_id; returns how many were new."""
        stored = _now_ms()
        rows = [
            {
                **{k: m[k] for k in _SCHEDULED_COLUMNS},
                "scheduled_ms": stored,
                "snapshot": orjson.dumps(m["snapshot"]).decode(),
            }
            for m in emails
        ]
        with self._tx() as conn:
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO scheduled_emails VALUES (:email_id, :customer_id,"
                " :campaign_id, :send_at_ms, :scheduled_ms, :subject, :html, :text, :snapshot)",
                rows,
            )
            return conn.total_changes - before

    def scheduled_emails(self) -> list[dict[str, Any]]:
        """Every e-mail still waiting for its send time, earliest first."""
        cursor = self._conn.execute(
            "SELECT email_id, customer_id, campaign_id, send_at_ms, subject, html, text, snapshot"
            " FROM scheduled_emails ORDER BY send_at_ms, email_id"
        )
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        for row in rows:
            row["snapshot"] = orjson.loads(row["snapshot"])
        return rows

    def still_scheduled(self, email_ids: Sequence[str]) -> set[str]:
        """Which of ``email_ids`` are still scheduled (``pipeline forget`` deletes a customer's)."""
        if not email_ids:
            return set()
        marks = ",".join("?" * len(email_ids))
        query = f"SELECT email_id FROM scheduled_emails WHERE email_id IN ({marks})"
        return {row[0] for row in self._conn.execute(query, list(email_ids))}

    def reschedule_emails(self, send_at_ms: Mapping[str, int]) -> int:
        """Move scheduled e-mails (by email_id) to new send times; returns how many moved."""
        with self._tx() as conn:
            return conn.executemany(
                "UPDATE scheduled_emails SET send_at_ms = ? WHERE email_id = ?",
                [(at, key) for key, at in send_at_ms.items()],
            ).rowcount

    def unschedule_emails(self, email_ids: Sequence[str]) -> int:
        """Forget scheduled e-mails that were sent or failed for good."""
        with self._tx() as conn:
            return conn.executemany(
                "DELETE FROM scheduled_emails WHERE email_id = ?", [(i,) for i in email_ids]
            ).rowcount

    def delete_older_than(self, table: str, time_column: str, cutoff_ms: int) -> int:
        """Delete the rows of ``table`` whose ``time_column`` (epoch ms) is before the cutoff."""
        if (table, time_column) not in _RETENTION_COLUMNS:
            raise StoreError(f"no retention rule for {table}.{time_column}")
        with self._tx() as conn:
            return conn.execute(
                f"DELETE FROM {table} WHERE {time_column} < ?", (cutoff_ms,)
            ).rowcount

    def _customer_conditions(
        self, keys: Sequence[str], anonymous_ids: Sequence[str], user_id: str
    ) -> dict[str, tuple[str, list[Any]]]:
        """Which rows are about a customer (``keys``: their id and their devices' anonymous
        profile ids) and their devices. A device may be shared: another customer's events and
        link on it are theirs and stay; its anonymous events go. Dead letters are matched by
        the ids in their JSON (escapes and numbers read as JSON does), so that an id inside
        another event's text is no match; only unreadable ones are matched by the text."""
        k = ",".join("?" * len(keys))
        a = ",".join("?" * len(anonymous_ids)) or "NULL"
        ids = [*keys, user_id]
        i = ",".join("?" * len(ids))
        texts = [f'"{t}"' for t in (user_id, *anonymous_ids)]
        raw = " OR ".join("instr(raw_text, ?) > 0" for _ in texts)
        fields = " OR ".join(
            [f"CAST(json_extract(raw_text, '$.{f}') AS TEXT) IN ({i})" for f in DEAD_LETTER_IDS]
            + [
                f"CAST(json_extract(raw_text, '$.{f}') AS TEXT) IN ({a})"
                for f in DEAD_LETTER_DEVICES
            ]
        )
        out = {
            "events": (
                f"customer_id IN ({k}) OR user_id = ? "
                f"OR (anonymous_id IN ({a}) AND {_anonymous('customer_id')})",
                [*keys, user_id, *anonymous_ids],
            ),
            "profiles": (f"customer_id IN ({k}) OR merged_into IN ({k})", [*keys, *keys]),
            "identity_links": (f"customer_id IN ({k})", list(keys)),
            "segment_changes": (f"customer_id IN ({k})", list(keys)),
            "email_triggers": (f"customer_id IN ({k})", list(keys)),
            "sent_emails": (f"customer_id IN ({k})", list(keys)),
            "scheduled_emails": (f"customer_id IN ({k})", list(keys)),
            "dead_letters": (
                f"message_key IN ({k}) OR message_key IN ({a}) OR CASE WHEN json_valid(raw_text) "
                f"THEN {fields} ELSE {raw} END",
                [*keys, *anonymous_ids, *ids * 3, *list(anonymous_ids) * 3, *texts],
            ),
            # a bot_identity alert names the identity it flagged
            "alerts": (
                f"subject IN ({k}) OR subject = ? OR subject IN ({a})",
                [*keys, user_id, *anonymous_ids],
            ),
        }
        present = {
            r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        return {t: c for t, c in out.items() if t in present}

    def delete_customer(
        self, keys: Sequence[str], anonymous_ids: Sequence[str], user_id: str
    ) -> dict[str, int]:
        """Delete every row about a customer and its devices (GDPR); rows deleted per table."""
        conditions = self._customer_conditions(keys, anonymous_ids, user_id)
        with self._tx() as conn:
            deleted = {
                t: conn.execute(f"DELETE FROM {t} WHERE {cond}", params).rowcount
                for t, (cond, params) in conditions.items()
            }
            k = ",".join("?" * len(keys))
            conn.execute(
                "UPDATE identity_links SET previous_customer_id = NULL "
                f"WHERE previous_customer_id IN ({k})",
                list(keys),
            )
        return deleted

    def delete_link(self, anonymous_id: str, customer_id: str | None = None) -> int:
        """Delete a device's identity link (only if it links to ``customer_id``, when given)."""
        sql = "DELETE FROM identity_links WHERE anonymous_id = ?"
        params: list[Any] = [anonymous_id]
        if customer_id is not None:
            sql += " AND customer_id = ?"
            params.append(customer_id)
        with self._tx() as conn:
            return int(conn.execute(sql, params).rowcount)

    def count_customer_rows(
        self, keys: Sequence[str], anonymous_ids: Sequence[str], user_id: str
    ) -> dict[str, int]:
        """Rows per table that still mention the customer (0 everywhere after forgetting)."""
        conditions = self._customer_conditions(keys, anonymous_ids, user_id)
        k = ",".join("?" * len(keys))
        links, params = conditions["identity_links"]
        conditions["identity_links"] = (
            f"{links} OR previous_customer_id IN ({k})",
            [*params, *keys],
        )
        return {
            t: int(self.scalar(f"SELECT COUNT(*) FROM {t} WHERE {cond}", params))
            for t, (cond, params) in conditions.items()
        }

    def linked_devices(self, customer_id: str) -> list[str]:
        """The anonymous ids ever linked to or seen with a customer."""
        rows = self._conn.execute(
            "SELECT anonymous_id FROM identity_links WHERE customer_id = ? "
            "UNION SELECT anonymous_id FROM events WHERE (user_id = ? OR customer_id = ?) "
            "AND anonymous_id IS NOT NULL",
            (customer_id, customer_id, customer_id),
        ).fetchall()
        return sorted(r[0] for r in rows)
