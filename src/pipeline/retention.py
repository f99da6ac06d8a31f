"""Retention of raw-ish data: clean events, dead letters and sent e-mails.

Locally, rows older than the configured days are deleted (events by event time, dead letters
by failure time, e-mails by send time). In BigQuery the same days become the tables'
partition expiration, so BigQuery drops old partitions itself. Profiles, identity links and
segment changes are kept: they are the customer's current state, removed only by ``forget``.
"""

from __future__ import annotations

from datetime import datetime

from pipeline.settings import RetentionSettings, Settings
from pipeline.stores.bigquery import BigQueryWarehouse
from pipeline.stores.local import LocalWarehouse

_DAY_MS = 86_400_000

# table → (time column in epoch ms, RetentionSettings field)
RULES: dict[str, tuple[str, str]] = {
    "events": ("event_ts_ms", "events_days"),
    "dead_letters": ("failed_ms", "dead_letters_days"),
    "sent_emails": ("sent_ms", "sent_emails_days"),
}


def retention_days(retention: RetentionSettings) -> dict[str, int | None]:
    """Days kept per table (None = forever)."""
    return {table: getattr(retention, field) for table, (_, field) in RULES.items()}


def apply_retention(
    warehouse: LocalWarehouse | BigQueryWarehouse, settings: Settings, now: datetime
) -> dict[str, int | None]:
    """Apply retention to one warehouse.

    Local: returns rows deleted per table. BigQuery: sets partition expiration and returns
    the days now configured per table (None = never expires).
    """
    days = retention_days(settings.retention)
    if isinstance(warehouse, BigQueryWarehouse):
        override = settings.bigquery.partition_expiration_days
        applied: dict[str, int | None] = {}
        for table, kept in days.items():
            applied[table] = override or kept
            warehouse.set_partition_expiration(table, applied[table])
        return applied
    now_ms = int(now.timestamp() * 1000)
    deleted: dict[str, int | None] = {}
    for table, kept in days.items():
        if kept is None:
            deleted[table] = 0
            continue
        column = RULES[table][0]
        deleted[table] = warehouse.delete_older_than(table, column, now_ms - kept * _DAY_MS)
    return deleted
