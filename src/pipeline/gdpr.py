"""The right to be forgotten: suppress a customer at once, delete them everywhere, prove it.

``forget`` first appends the customer to the suppression list (``PIPELINE_HOME/suppression.jsonl``)
so the collector and the processor drop their new events (both call :func:`is_suppressed`),
then deletes every row about the customer and their devices from the local warehouse (which
is also the profile store) and from BigQuery, and appends an audit record to
``PIPELINE_HOME/audit/forget.jsonl``. The list and the audit hold SHA-256 pseudonyms only.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable, Iterable, Set
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from pipeline.identity import anonymous_customer_id
from pipeline.pii import sha256_hex
from pipeline.settings import Settings
from pipeline.stores.bigquery import BigQueryWarehouse
from pipeline.stores.local import LocalWarehouse

SUPPRESSION_FILE = "suppression.jsonl"
AUDIT_FILE = Path("audit") / "forget.jsonl"


def suppression_path(settings: Settings) -> Path:
    return settings.home / SUPPRESSION_FILE


def audit_path(settings: Settings) -> Path:
    return settings.home / AUDIT_FILE


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(orjson.dumps(record) + b"\n")


def _entries(settings: Settings) -> list[dict[str, Any]]:
    path = suppression_path(settings)
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def load_suppressed(settings: Settings) -> frozenset[str]:
    """Hashes of every suppressed identity (customer ids and ``anon:<device>`` keys)."""
    return frozenset(h for e in _entries(settings) for h in e["ids"])


def is_suppressed(
    suppressed: Set[str],
    *,
    customer_id: str | None = None,
    user_id: str | None = None,
    anonymous_id: str | None = None,
) -> bool:
    """True when any identity of an event belongs to a forgotten customer."""
    if not suppressed:
        return False
    keys = [customer_id, user_id, anonymous_customer_id(anonymous_id) if anonymous_id else None]
    return any(k is not None and sha256_hex(k) in suppressed for k in keys)


@dataclass(frozen=True, slots=True)
class ForgetReport:
    """What ``forget`` did: devices found and rows deleted per ``store.table``."""

    customer_sha256: str
    devices: int
    deleted: dict[str, int] = field(default_factory=dict)
    at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _keys(customer_id: str, devices: Iterable[str]) -> list[str]:
    return [customer_id, *(anonymous_customer_id(d) for d in devices)]


def forget(
    customer_id: str,
    settings: Settings,
    *,
    warehouse: LocalWarehouse,
    bigquery: BigQueryWarehouse | None = None,
    now: datetime | None = None,
) -> ForgetReport:
    """Suppress, delete everywhere and audit one customer (see module docstring)."""
    at = (now or datetime.now(UTC)).isoformat()
    devices = set(warehouse.linked_devices(customer_id))
    if bigquery is not None:
        devices |= set(_bigquery_devices(bigquery, customer_id))
    keys = _keys(customer_id, sorted(devices))
    subject = sha256_hex(customer_id)
    _append_jsonl(
        suppression_path(settings),
        {"customer": subject, "ids": [sha256_hex(k) for k in keys], "at": at},
    )
    local = warehouse.delete_customer(keys, sorted(devices), customer_id)
    deleted = {f"local.{t}": n for t, n in local.items()}
    if bigquery is not None:
        bq = bigquery.delete_customer(keys, sorted(devices), customer_id)
        deleted |= {f"bigquery.{t}": n for t, n in bq.items()}
    report = ForgetReport(subject, len(devices), deleted, at)
    _append_jsonl(audit_path(settings), {"action": "forget", **report.to_dict()})
    return report


def _bigquery_devices(bigquery: BigQueryWarehouse, customer_id: str) -> list[str]:
    df = bigquery.query(
        "SELECT anonymous_id FROM identity_links WHERE customer_id = @c UNION DISTINCT "
        "SELECT anonymous_id FROM events WHERE (user_id = @c OR customer_id = @c) "
        "AND anonymous_id IS NOT NULL",
        {"c": customer_id},
    )
    return [str(a) for a in df["anonymous_id"]]


def _forgotten_devices(candidates: Iterable[str], hashes: Set[str]) -> list[str]:
    return sorted({d for d in candidates if sha256_hex(anonymous_customer_id(d)) in hashes})


def verify_forgotten(
    customer_id: str,
    settings: Settings,
    *,
    warehouse: LocalWarehouse,
    bigquery: BigQueryWarehouse | None = None,
) -> dict[str, int]:
    """Rows per ``store.table`` still about the customer; all 0 once forgotten.

    The customer's devices come from the suppression list (hashed) matched against every
    device id still stored, so rows that escaped deletion are found too.
    """
    subject = sha256_hex(customer_id)
    hashes = {h for e in _entries(settings) if e["customer"] == subject for h in e["ids"]}
    result: dict[str, int] = {}
    stored = warehouse.query(
        "SELECT anonymous_id AS d FROM events WHERE anonymous_id IS NOT NULL "
        "UNION SELECT anonymous_id FROM identity_links"
    )["d"]
    devices = _forgotten_devices(map(str, stored), hashes)
    counts = warehouse.count_customer_rows(_keys(customer_id, devices), devices, customer_id)
    result |= {f"local.{t}": n for t, n in counts.items()}
    if bigquery is not None:
        bq_stored = bigquery.query(
            "SELECT DISTINCT anonymous_id AS d FROM events WHERE anonymous_id IS NOT NULL "
            "UNION DISTINCT SELECT anonymous_id FROM identity_links"
        )["d"]
        bq_devices = _forgotten_devices(map(str, bq_stored), hashes)
        bq_counts = bigquery.count_customer_rows(
            _keys(customer_id, bq_devices), bq_devices, customer_id
        )
        result |= {f"bigquery.{t}": n for t, n in bq_counts.items()}
    return result


def suppression_source(settings: Settings, ttl_s: float = 5.0) -> Callable[[], frozenset[str]]:
    """The forgotten customers' hashed ids, re-read at most every ``ttl_s`` seconds."""
    loaded_at = -float("inf")
    current: frozenset[str] = frozenset()

    def get() -> frozenset[str]:
        nonlocal loaded_at, current
        if time.monotonic() - loaded_at > ttl_s:
            current, loaded_at = load_suppressed(settings), time.monotonic()
        return current

    return get
