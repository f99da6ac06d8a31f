"""Incremental CRM import: customers from a CSV export or a SQLite table onto ``crm.customers``.

Each source keeps a watermark, the ``(updated_at, customer_id)`` of the last record produced,
in ``PIPELINE_HOME/sync/<source>.json``; a sync reads only newer records, produces them with the
idempotent producer, flushes, and only then advances the watermark. Re-running a sync
therefore produces nothing; a crash before the watermark moves re-sends records that the
processor applies idempotently (see :func:`merge_crm_record`). A row dated after the clock
(by more than :data:`CRM_CLOCK_SKEW`) is rejected, by the sync and by the processor: as the
watermark it would hide every row saved before its date.

Conflict resolution, applied by the processor through :func:`merge_crm_record`:

* newest ``updated_at`` wins: a CRM record older than the last one applied is ignored;
* e-mail and consent always come from the CRM (the system of record for contactability),
  whatever the tracked identify traits say; the address is normalized (trimmed, lower case);
* loyalty tier comes from the CRM; names and time zone from the CRM unless the tracked traits
  were updated after the CRM record (``traits_updated_ms``), in which case the CRM only fills
  gaps; an empty CRM field never erases a known trait.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import PipelineError
from pipeline.identity import reserved_id_problem
from pipeline.pii import normalize_email
from pipeline.settings import Settings
from pipeline.simulate.model import TrueCustomer

log = logging.getLogger(__name__)

CRM_FIELDS = (
    "customer_id",
    "email",
    "first_name",
    "last_name",
    "timezone",
    "loyalty_tier",
    "email_consent",
    "updated_at",
)
LOYALTY_TIERS = ("bronze", "silver", "gold", "platinum")
CRM_UPDATED_TRAIT = "crmUpdatedAt"
# CRM field → profile trait (Segment's camelCase trait names).
_TRAITS = {
    "email": "email",
    "first_name": "firstName",
    "last_name": "lastName",
    "timezone": "timezone",
    "loyalty_tier": "loyaltyTier",
    "email_consent": "emailConsent",
}
_CRM_ALWAYS_WINS = frozenset({"email", "email_consent", "loyalty_tier"})
# How far past the clock a row's updated_at may be (the CRM's clock against ours). A later one
# is a mistake (a typo, a local time read as UTC): as a watermark it would hide every row
# saved before it, and as a customer's crmUpdatedAt every CRM change to them until then.
CRM_CLOCK_SKEW = timedelta(minutes=5)


class SyncError(PipelineError):
    """A CRM source could not be read."""


def _parse_time(value: str) -> datetime:
    t = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _parse_bool(value: Any) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool | int):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "opt-in", "subscribed"):
        return True
    if text in ("false", "0", "no", "n", "opt-out", "unsubscribed"):
        return False
    raise ValueError(f"not a consent value: {value!r}")


def _undecodable_field(row: Mapping[str, Any]) -> str | None:
    """The first CRM field of ``row`` whose text was not UTF-8 (read with surrogateescape)."""
    for name in CRM_FIELDS:
        value = row.get(name)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return name
    return None


@dataclass(frozen=True, slots=True)
class CrmRecord:
    """One customer as the CRM knows it; ``updated_at`` is timezone-aware UTC."""

    customer_id: str
    updated_at: datetime
    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    timezone: str | None = None
    loyalty_tier: str | None = None
    email_consent: bool | None = None

    @staticmethod
    def parse(row: Mapping[str, Any], source: str, *, now: datetime | None = None) -> CrmRecord:
        """Validate a source row; raises SyncError naming the source and customer. A row
        updated later than ``now`` (the clock) and :data:`CRM_CLOCK_SKEW` is refused."""
        cid = str(row.get("customer_id") or "").strip()
        try:
            undecodable = _undecodable_field(row)
            if undecodable is not None:
                cid = cid.encode("utf-8", "backslashreplace").decode("utf-8")
                raise ValueError(f"{undecodable} is not UTF-8 text")
            if not cid:
                raise ValueError("customer_id is empty")
            reserved = reserved_id_problem(cid)
            if reserved is not None:
                raise ValueError(f"customer_id {reserved}")

            def text(name: str) -> str | None:
                value = row.get(name)
                return str(value).strip() or None if value is not None else None

            updated_at = _parse_time(str(row["updated_at"])).astimezone(UTC)
            latest = (now or datetime.now(UTC)) + CRM_CLOCK_SKEW
            if updated_at > latest:
                raise ValueError(
                    f"updated_at {updated_at.isoformat()} is in the future "
                    f"(later than {latest.isoformat(timespec='seconds')})"
                )
            email = text("email")
            return CrmRecord(
                customer_id=cid,
                updated_at=updated_at,
                email=normalize_email(email) if email else None,
                first_name=text("first_name"),
                last_name=text("last_name"),
                timezone=text("timezone"),
                loyalty_tier=text("loyalty_tier"),
                email_consent=_parse_bool(row.get("email_consent")),
            )
        except (KeyError, ValueError, OverflowError) as exc:  # (a year past 9999 in UTC)
            raise SyncError(f"sync {source}: bad CRM row for {cid or '?'}: {exc}") from exc

    @property
    def position(self) -> tuple[str, str]:
        """Watermark order: (updated_at ISO, customer_id)."""
        return (self.updated_at.isoformat(), self.customer_id)

    def to_message(self, source: str) -> dict[str, Any]:
        """The JSON value produced to ``crm.customers`` (keyed by customer_id)."""
        return {**asdict(self), "updated_at": self.updated_at.isoformat(), "source": source}


def merge_crm_record(
    profile_traits: Mapping[str, Any],
    crm_record: Mapping[str, Any],
    *,
    traits_updated_ms: int | None = None,
) -> dict[str, Any]:
    """Profile traits after applying one CRM record (a ``crm.customers`` value); pure.

    See the module docstring for the precedence rules.
    """
    updated = _parse_time(str(crm_record["updated_at"]))
    applied = profile_traits.get(CRM_UPDATED_TRAIT)
    if isinstance(applied, str) and _parse_time(applied) > updated:
        return dict(profile_traits)
    tracked_newer = traits_updated_ms is not None and traits_updated_ms > updated.timestamp() * 1000
    out = dict(profile_traits)
    for field, trait in _TRAITS.items():
        value = crm_record.get(field)
        if value is None or value == "":
            continue
        if field == "email":
            value = normalize_email(str(value))
        if field in _CRM_ALWAYS_WINS or not tracked_newer or trait not in out:
            out[trait] = value
    out[CRM_UPDATED_TRAIT] = updated.astimezone(UTC).isoformat()
    return out


def crm_rows_from_customers(
    customers: Iterable[TrueCustomer], *, as_of: datetime
) -> list[dict[str, str]]:
    """A deterministic CRM export of the simulator's known customers (for ``sample_data``)."""
    rows = []
    for c in customers:
        if not c.is_known:
            continue
        n = int(c.customer_id.rsplit("_", 1)[-1])
        updated = as_of.replace(hour=n % 24, minute=(n * 7) % 60, second=0, microsecond=0)
        rows.append(
            {
                "customer_id": c.customer_id,
                "email": c.email or "",
                "first_name": c.first_name or "",
                "last_name": c.last_name or "",
                "timezone": c.timezone,
                "loyalty_tier": LOYALTY_TIERS[(n * 7) % 10 % 4],
                "email_consent": "false" if n % 9 == 0 else "true",
                "updated_at": updated.astimezone(UTC).isoformat(),
            }
        )
    return rows


def write_crm_csv(rows: Sequence[Mapping[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CRM_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a CRM CSV export: UTF-8, with or without a byte order mark (spreadsheets write
    one). A byte that is not UTF-8 stays in its row as a lone surrogate, for
    :meth:`CrmRecord.parse` to refuse that row alone."""
    try:
        with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            yield from csv.DictReader(f)
    except OSError as exc:
        raise SyncError(f"sync csv:{path.name}: cannot read {path}: {exc}") from exc


def read_sqlite(path: Path, table: str, since: str | None) -> Iterator[dict[str, Any]]:
    """Rows of a SQLite table changed at or after ``since`` (ISO text, UTC), oldest first, and
    those whose ``updated_at`` is not text at all (NULL, a number), which no text comparison
    selects: parsed, they are refused and reported, not skipped without a word."""
    if not table.isidentifier():
        raise SyncError(f"sync sqlite:{path.name}: bad table name {table!r}")
    try:
        # percent-encoded: in a plain file: URI a '#' or '?' in the path would end it
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise SyncError(f"sync sqlite:{path.name}: cannot open {path}: {exc}") from exc
    try:
        conn.row_factory = sqlite3.Row
        # text that is not UTF-8 would fail the whole query: its row is refused by the parse
        conn.text_factory = lambda data: data.decode("utf-8", "surrogateescape")
        cur = conn.execute(
            f"SELECT * FROM {table} WHERE updated_at >= ? OR typeof(updated_at) != 'text' "
            "ORDER BY updated_at, customer_id",
            (since or "",),
        )
        for row in cur:
            yield dict(row)
    except sqlite3.Error as exc:
        raise SyncError(f"sync sqlite:{path.name}: query on {table} failed: {exc}") from exc
    finally:
        conn.close()


class RecordProducer(Protocol):
    """Where synced records go: Kafka in production, a list in tests."""

    def send(self, key: str, value: dict[str, Any]) -> None: ...

    def flush(self) -> None: ...


class KafkaRecordProducer:
    """Produces JSON records to one topic with the idempotent producer."""

    def __init__(self, settings: Settings, address: str, topic: str | None = None) -> None:
        from pipeline.runner import make_producer

        self._producer = make_producer(settings, address)
        self._topic = topic or settings.topics.crm_customers

    def send(self, key: str, value: dict[str, Any]) -> None:
        while True:
            try:
                self._producer.produce(self._topic, key=key, value=json.dumps(value))
                return
            except BufferError:
                self._producer.poll(0.05)

    def flush(self) -> None:
        remaining = self._producer.flush(60)
        if remaining:
            raise SyncError(f"sync: {remaining} records to {self._topic} not acknowledged")


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What one source's sync did; ``rejected`` names the rows it could not read (they stay
    in the source, to be fixed there; the others are synced all the same)."""

    source: str
    produced: int
    watermark: tuple[str, str] | None
    rejected: tuple[str, ...] = ()


def _watermark_path(settings: Settings, source: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in source)
    return settings.home / "sync" / f"{safe}.json"


def load_watermark(settings: Settings, source: str) -> tuple[str, str] | None:
    """The newest (updated_at, customer_id) synced from ``source``, None before its first sync."""
    data = _load_mark(settings, source)
    return None if data is None else (data["updated_at"], data["customer_id"])


def _load_mark(settings: Settings, source: str) -> dict[str, Any] | None:
    path = _watermark_path(settings, source)
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _store_watermark(
    settings: Settings, source: str, mark: tuple[str, str], sent_at_mark: Iterable[str]
) -> None:
    path = _watermark_path(settings, source)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    data = {"updated_at": mark[0], "customer_id": mark[1], "sent_at_mark": sorted(sent_at_mark)}
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def sync_records(
    settings: Settings,
    source: str,
    rows: Iterable[Mapping[str, Any]],
    producer: RecordProducer,
    *,
    now: datetime | None = None,
) -> SyncResult:
    """Produce the rows newer than the source's watermark, then advance it.

    The watermark is the newest ``updated_at`` with the ids already sent at that very time: a
    row saved later in the same instant (any id) is still new, and none is sent twice. A row
    that cannot be read is reported (logged, and in the result) and skipped, so that one bad
    row does not hold back the others; it stays in the source to be fixed there. So is a row
    updated after ``now`` (the clock, see :meth:`CrmRecord.parse`), which a later sync takes
    once its time has come.
    """
    now = now or datetime.now(UTC)
    data = _load_mark(settings, source)
    mark_at = _parse_time(data["updated_at"]) if data else None
    sent: set[str] = set(data.get("sent_at_mark", ())) if data else set()
    # a mark from before the ids were kept: those up to its id at that instant were sent
    legacy_id = data["customer_id"] if data and "sent_at_mark" not in data else None
    records: list[CrmRecord] = []
    rejected: list[str] = []
    for row in rows:
        try:
            records.append(CrmRecord.parse(row, source, now=now))
        except SyncError as exc:
            log.warning("%s", exc)
            rejected.append(str(exc))
    fresh = [
        r
        for r in records
        if mark_at is None
        or r.updated_at > mark_at
        or (
            r.updated_at == mark_at
            and r.customer_id not in sent
            and (legacy_id is None or r.customer_id > legacy_id)
        )
    ]
    fresh.sort(key=lambda r: r.position)
    for record in fresh:
        producer.send(record.customer_id, record.to_message(source))
    producer.flush()
    mark = load_watermark(settings, source)
    if fresh:
        newest = fresh[-1]
        mark = newest.position
        at_mark = {r.customer_id for r in fresh if r.updated_at == newest.updated_at}
        if newest.updated_at == mark_at:
            at_mark |= sent
        _store_watermark(settings, source, mark, at_mark)
    return SyncResult(source, len(fresh), mark, tuple(rejected))


def sync_crm(settings: Settings, producer: RecordProducer) -> list[SyncResult]:
    """Sync every configured CRM source (CSV export, SQLite table)."""
    results = []
    cfg = settings.sync
    if cfg.crm_csv_path is not None:
        source = f"csv:{cfg.crm_csv_path.name}"
        results.append(sync_records(settings, source, read_csv(cfg.crm_csv_path), producer))
    if cfg.crm_sqlite_path is not None:
        source = f"sqlite:{cfg.crm_sqlite_path.name}:{cfg.crm_sqlite_table}"
        mark = load_watermark(settings, source)
        # Text comparison only narrows the scan; the exact filter is on parsed times. A day
        # early: the table's text may carry any UTC offset (20:00-05:00 is the next UTC day).
        since = (_parse_time(mark[0]) - timedelta(days=1)).date().isoformat() if mark else None
        rows = read_sqlite(cfg.crm_sqlite_path, cfg.crm_sqlite_table, since)
        results.append(sync_records(settings, source, rows, producer))
    return results
