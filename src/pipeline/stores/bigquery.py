"""The production warehouse on BigQuery, with the write methods and tables of the local one.

Idempotency, as in :class:`~pipeline.stores.local.LocalWarehouse`:

* events, dead letters, segment changes, sent e-mails and alerts are streamed with
  ``insert_rows_json(row_ids=...)`` (insertId = messageId). BigQuery's insertId dedupe is
  best effort (about a minute) and emulators ignore it, so keys already stored are looked up
  first (partition-pruned for events): a batch retried any time later inserts nothing.
* profiles and identity links are upserted with one ``MERGE`` per batch whose source is an
  ``ARRAY<STRUCT>`` query parameter (no staging table, so no load-job quota per checkpoint);
  an older ``version`` (``linked_ms``) never overwrites a newer one.
* an anonymous attribution is upgraded to the known customer with an ``UPDATE``; BigQuery
  refuses DML on rows still in the streaming buffer, so such upgrades wait for a later batch.

Transient failures (429/5xx, connection resets, per-row ``backendError``) are retried with
exponential backoff. Credentials come from Google's standard configuration (ADC:
``GOOGLE_APPLICATION_CREDENTIALS``, gcloud, metadata server); with ``api_endpoint`` set
(an emulator) the client is anonymous. Timestamps travel as ISO strings and dates as
``YYYY-MM-DD``; times themselves are INT64 epoch ms, as locally.

SQL dialect differences a notebook may meet (the table and column names are the same):
parameters are ``@name`` here and ``?``/``:name`` in SQLite; JSON is read with
``JSON_VALUE(payload, '$.x')`` here and ``json_extract(payload, '$.x')`` there; date
columns are DATE here and text there (compare with ``'2024-01-31'`` literals on both).
Unqualified table names resolve to the configured dataset.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import date, datetime
from typing import Any

import pandas as pd
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.api_core.retry import Retry
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery

from pipeline.errors import StoreError
from pipeline.identity import is_anonymous
from pipeline.settings import BigQuerySettings
from pipeline.stores.bq_schema import (
    ALERTS,
    DEAD_LETTERS,
    EVENTS,
    IDENTITY_LINKS,
    PROFILES,
    SCHEMA_VERSION,
    SEGMENT_CHANGES,
    SENT_EMAILS,
    TABLES,
    TableSpec,
)
from pipeline.stores.rows import (
    alert_row,
    dead_letter_row,
    earliest_lineage,
    event_row,
    profile_row,
    sent_email_row,
)

log = logging.getLogger(__name__)

_DAY_MS = 86_400_000
_TRANSIENT = (
    gexc.TooManyRequests,
    gexc.InternalServerError,
    gexc.BadGateway,
    gexc.ServiceUnavailable,
    gexc.GatewayTimeout,
    ConnectionError,
)
_TRANSIENT_ROW_REASONS = frozenset({"backendError", "timeout", "internalError", "stopped"})


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _TRANSIENT):
        return True
    if isinstance(exc, gexc.Forbidden | gexc.BadRequest):
        reasons = {e.get("reason") for e in getattr(exc, "errors", None) or []}
        return bool(reasons & {"rateLimitExceeded", "backendError"})
    return False


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _chunks(rows: Sequence[dict[str, Any]], size: int) -> Iterator[Sequence[dict[str, Any]]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def _keep_latest(rows: Iterable[dict[str, Any]], key: str, order: str) -> list[dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for r in rows:
        cur = latest.get(r[key])
        if cur is None or r[order] >= cur[order]:
            latest[r[key]] = r
    return list(latest.values())


def _param(name: str, value: Any) -> bigquery.ScalarQueryParameter | bigquery.ArrayQueryParameter:
    """A query parameter whose type follows the Python value."""
    if isinstance(value, list | tuple | set | frozenset):
        items = list(value)
        first = _param(name, items[0]) if items else None
        kind = first.type_ if isinstance(first, bigquery.ScalarQueryParameter) else "STRING"
        return bigquery.ArrayQueryParameter(name, kind, items)
    if isinstance(value, bool):
        return bigquery.ScalarQueryParameter(name, "BOOL", value)
    if isinstance(value, int):
        return bigquery.ScalarQueryParameter(name, "INT64", value)
    if isinstance(value, float):
        return bigquery.ScalarQueryParameter(name, "FLOAT64", value)
    if isinstance(value, datetime):
        return bigquery.ScalarQueryParameter(name, "TIMESTAMP", value.isoformat())
    if isinstance(value, date):
        return bigquery.ScalarQueryParameter(name, "DATE", value.isoformat())
    return bigquery.ScalarQueryParameter(name, "STRING", value)


def _struct_rows(
    spec: TableSpec, rows: Sequence[Mapping[str, Any]]
) -> bigquery.ArrayQueryParameter:
    """``rows`` as an ``ARRAY<STRUCT>`` parameter ``@rows`` typed by the table's schema."""
    return bigquery.ArrayQueryParameter(
        "rows",
        "STRUCT",
        [
            bigquery.StructQueryParameter(
                None,
                *(
                    bigquery.ScalarQueryParameter(c.name, c.type, r.get(c.name))
                    for c in spec.columns
                ),
            )
            for r in rows
        ],
    )


def _merge_sql(spec: TableSpec, order: str) -> str:
    """MERGE of ``@rows`` into ``spec`` on its key; a row with a lower ``order`` loses."""
    cols = spec.column_names
    source = ", ".join(f"r.{c} AS {c}" for c in cols)
    on = " AND ".join(f"T.{k} = S.{k}" for k in spec.key)
    update = ", ".join(f"{c} = S.{c}" for c in cols if c not in spec.key)
    return (
        f"MERGE `{spec.name}` T USING (SELECT {source} FROM UNNEST(@rows) AS r) S ON {on} "
        f"WHEN MATCHED AND S.{order} >= T.{order} THEN UPDATE SET {update} "
        f"WHEN NOT MATCHED THEN INSERT ({', '.join(cols)}) "
        f"VALUES ({', '.join('S.' + c for c in cols)})"
    )


def _row_id(spec: TableSpec, row: Mapping[str, Any]) -> str:
    return ":".join(str(row[k]) for k in spec.key)


def _row_id_sql(spec: TableSpec) -> str:
    if len(spec.key) == 1:
        return spec.key[0]
    parts = [k if spec.type_of(k) == "STRING" else f"CAST({k} AS STRING)" for k in spec.key]
    return "CONCAT(" + ", ':', ".join(parts) + ")"


def make_client(settings: BigQuerySettings) -> bigquery.Client:
    """A client from ADC, or an anonymous one for ``api_endpoint`` (an emulator)."""
    if settings.api_endpoint:
        return bigquery.Client(
            project=settings.project or "local-project",
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options=ClientOptions(api_endpoint=settings.api_endpoint),
            location=settings.location,
        )
    return bigquery.Client(project=settings.project, location=settings.location)


# The rows about a customer (``@keys``: their id and their devices' anonymous profile ids) and
# their devices (``@anon``), as in the local warehouse: a shared device's events and link of
# another customer stay; dead letters are matched by the ids in their JSON, and only
# unreadable ones by their text.
_DEAD_LETTER_JSON = " OR ".join(
    f"JSON_VALUE(SAFE.PARSE_JSON(raw_text), '$.{field}') IN UNNEST(@{ids})"
    for field, ids in (
        *((f, "ids") for f in ("userId", "customer_id", "user_id")),
        *((f, "anon") for f in ("anonymousId", "previousId", "anonymous_id")),
    )
)
_NO_DEVICE = "\x00"  # stands for "no device" in @anon: no id is NUL (an empty one could be)
_CUSTOMER_ROWS: dict[str, str] = {
    "events": "customer_id IN UNNEST(@keys) OR user_id = @user "
    "OR (anonymous_id IN UNNEST(@anon) AND STARTS_WITH(customer_id, 'anon:'))",
    "profiles": "customer_id IN UNNEST(@keys) OR merged_into IN UNNEST(@keys)",
    "identity_links": "customer_id IN UNNEST(@keys)",
    "segment_changes": "customer_id IN UNNEST(@keys)",
    "sent_emails": "customer_id IN UNNEST(@keys)",
    "dead_letters": "message_key IN UNNEST(@keys) OR message_key IN UNNEST(@anon) OR "
    f"{_DEAD_LETTER_JSON} OR (SAFE.PARSE_JSON(raw_text) IS NULL AND "
    "EXISTS (SELECT 1 FROM UNNEST(@texts) AS t WHERE STRPOS(raw_text, t) > 0))",
    "alerts": "subject IN UNNEST(@keys) OR subject = @user OR subject IN UNNEST(@anon)",
}


def _customer_params(
    customer_keys: Sequence[str], anonymous_ids: Sequence[str], user_id: str
) -> dict[str, Any]:
    keys = list(customer_keys)
    return {
        "keys": keys,
        "anon": list(anonymous_ids) or [_NO_DEVICE],
        "ids": [*keys, user_id],
        "user": user_id,
        "texts": [f'"{t}"' for t in (user_id, *anonymous_ids)],
    }


class BigQueryWarehouse:
    """The warehouse in one BigQuery dataset; call :meth:`ensure_schema` once before writing."""

    def __init__(self, settings: BigQuerySettings, client: bigquery.Client | None = None) -> None:
        self.settings = settings
        try:
            self.client = client or make_client(settings)
        except Exception as exc:  # google.auth raises its own DefaultCredentialsError
            raise StoreError(f"BigQuery: cannot create a client: {exc}") from exc
        self.dataset_id = f"{self.client.project}.{settings.dataset}"
        self._retry = Retry(
            predicate=_is_transient,
            initial=0.5,
            maximum=16.0,
            multiplier=2.0,
            timeout=settings.retry_deadline_s,
        )
        self._pending_upgrades: list[dict[str, Any]] = []

    def close(self) -> None:
        self.client.close()  # type: ignore[no-untyped-call]

    def __enter__(self) -> BigQueryWarehouse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def table_id(self, name: str) -> str:
        return f"{self.dataset_id}.{name}"

    def ensure_schema(self, expiration_days: Mapping[str, int | None] | None = None) -> list[str]:
        """Create the dataset and every missing table; returns the tables created.

        ``expiration_days`` maps a table to its partition expiry (see :mod:`pipeline.retention`).
        """
        ds = bigquery.Dataset(self.dataset_id)
        ds.location = self.settings.location
        ds.labels = {"schema_version": str(SCHEMA_VERSION)}
        self._call(lambda: self.client.create_dataset(ds, exists_ok=True), "create dataset")
        existing = {t.table_id for t in self.client.list_tables(self.dataset_id, retry=self._retry)}
        created = []
        for spec in TABLES.values():
            if spec.name in existing:
                self._check_columns(spec)
                continue
            table = self._table(spec, (expiration_days or {}).get(spec.name))
            self._call(lambda t=table: self.client.create_table(t, exists_ok=True), spec.name)
            created.append(spec.name)
        return created

    def _table(self, spec: TableSpec, expiration_days: int | None) -> bigquery.Table:
        schema = [
            bigquery.SchemaField(c.name, c.type, mode="REQUIRED" if c.required else "NULLABLE")
            for c in spec.columns
        ]
        table = bigquery.Table(self.table_id(spec.name), schema=schema)
        table.description = spec.description
        table.labels = {"schema_version": str(SCHEMA_VERSION)}
        if spec.partition:
            days = self.settings.partition_expiration_days or expiration_days
            table.time_partitioning = bigquery.TimePartitioning(
                type_=bigquery.TimePartitioningType.DAY,
                field=None if spec.partition == "_INGESTION" else spec.partition,
                expiration_ms=days * _DAY_MS if days else None,
            )
        if spec.clustering:
            table.clustering_fields = list(spec.clustering)
        return table

    def _check_columns(self, spec: TableSpec) -> None:
        table = self.client.get_table(self.table_id(spec.name), retry=self._retry)
        missing = set(spec.column_names) - {f.name for f in table.schema}
        added = [c for c in spec.columns if c.name in missing and not c.required]
        if added:
            # additive migration: BigQuery lets a table gain NULLABLE columns in place
            table.schema = [
                *table.schema,
                *(bigquery.SchemaField(c.name, c.type, mode="NULLABLE") for c in added),
            ]
            self.client.update_table(table, ["schema"], retry=self._retry)
            missing -= {c.name for c in added}
        if missing:
            raise StoreError(
                f"BigQuery table {self.table_id(spec.name)} lacks columns {sorted(missing)}: "
                f"it predates schema version {SCHEMA_VERSION}; migrate it first"
            )

    def set_partition_expiration(self, name: str, days: int | None) -> None:
        """Let BigQuery drop ``name``'s partitions older than ``days`` (None = keep forever)."""
        table = self.client.get_table(self.table_id(name), retry=self._retry)
        partitioning = table.time_partitioning
        if partitioning is None:
            raise StoreError(f"BigQuery table {table.table_id} is not partitioned")
        partitioning.expiration_ms = days * _DAY_MS if days else None
        table.time_partitioning = partitioning
        self._call(lambda: self.client.update_table(table, ["time_partitioning"]), name)

    def partition_expiration_days(self, name: str) -> float | None:
        table = self.client.get_table(self.table_id(name), retry=self._retry)
        ms = table.time_partitioning.expiration_ms if table.time_partitioning else None
        return None if ms is None else ms / _DAY_MS

    def _call(self, fn: Any, what: str) -> Any:
        try:
            return self._retry(fn)()
        except gexc.GoogleAPIError as exc:
            raise StoreError(f"BigQuery {what} failed: {exc}") from exc

    def _job_config(self, params: Sequence[Any] = ()) -> bigquery.QueryJobConfig:
        return bigquery.QueryJobConfig(
            default_dataset=self.dataset_id, query_parameters=list(params)
        )

    def run(self, sql: str, params: Sequence[Any] = (), *, what: str = "query") -> int:
        """Run a DML statement; returns the rows it affected."""

        def go() -> int:
            job = self.client.query(sql, job_config=self._job_config(params))
            job.result()
            return int(job.num_dml_affected_rows or 0)

        return int(self._call(go, what))

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """Run a read query (unqualified names resolve to the dataset) into a DataFrame."""
        qparams = [_param(k, v) for k, v in (params or {}).items()]

        def go() -> pd.DataFrame:
            job = self.client.query(sql, job_config=self._job_config(qparams))
            return job.to_dataframe(create_bqstorage_client=False)

        df: pd.DataFrame = self._call(go, "query")
        return df

    def scalar(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        df = self.query(sql, params)
        return None if df.empty else df.iat[0, 0]

    def counts(self) -> dict[str, int]:
        """Row counts of every table."""
        return {t: int(self.scalar(f"SELECT COUNT(*) FROM `{t}`")) for t in TABLES}

    def _existing(
        self, spec: TableSpec, ids: Sequence[str], *, days: tuple[str, str] | None = None
    ) -> dict[str, str | None]:
        """The stored rows among ``ids`` (id → customer_id where the table has one)."""
        extra = "customer_id" if "customer_id" in spec.column_names else "NULL"
        sql = f"SELECT {_row_id_sql(spec)} AS id, {extra} AS cid FROM `{spec.name}` WHERE "
        params: list[Any] = [bigquery.ArrayQueryParameter("ids", "STRING", list(ids))]
        if days and spec.partition and spec.partition != "_INGESTION":
            sql += f"{spec.partition} BETWEEN @lo AND @hi AND "
            params += [
                _param("lo", date.fromisoformat(days[0])),
                _param("hi", date.fromisoformat(days[1])),
            ]
        sql += f"{_row_id_sql(spec)} IN UNNEST(@ids)"

        def go() -> dict[str, str | None]:
            job = self.client.query(sql, job_config=self._job_config(params))
            return {row["id"]: row["cid"] for row in job.result()}

        found: dict[str, str | None] = self._call(go, f"lookup in {spec.name}")
        return found

    def _insert(self, spec: TableSpec, rows: Sequence[dict[str, Any]]) -> None:
        """Stream rows with insertIds, retrying transient per-row errors with backoff."""
        pending = list(rows)
        delay = 0.5
        deadline = time.monotonic() + self.settings.retry_deadline_s
        while pending:
            errors = self._call(
                lambda p=pending: self.client.insert_rows_json(
                    self.table_id(spec.name), p, row_ids=[_row_id(spec, r) for r in p]
                ),
                f"insert into {spec.name}",
            )
            if not errors:
                return
            failed = {e["index"] for e in errors}
            reasons = {err.get("reason") for e in errors for err in e.get("errors", [])}
            if not reasons <= _TRANSIENT_ROW_REASONS or time.monotonic() > deadline:
                raise StoreError(f"BigQuery insert into {spec.name} refused rows: {errors[:3]}")
            pending = [r for i, r in enumerate(pending) if i in failed]
            time.sleep(delay)
            delay = min(delay * 2, 16.0)

    def _insert_once(
        self, spec: TableSpec, rows: Sequence[dict[str, Any]], *, date_column: str | None = None
    ) -> list[dict[str, Any]]:
        """Insert the rows whose key is not stored yet; returns the rows that were stored."""
        unique = {_row_id(spec, r): r for r in rows}
        stored: list[dict[str, Any]] = []
        for chunk in _chunks(list(unique.values()), self.settings.insert_batch_size):
            days = None
            if date_column:
                values = [r[date_column] for r in chunk]
                days = (min(values), max(values))
            existing = self._existing(spec, [_row_id(spec, r) for r in chunk], days=days)
            new = [r for r in chunk if _row_id(spec, r) not in existing]
            if new:
                self._insert(spec, new)
            stored += [r for r in chunk if _row_id(spec, r) in existing]
        return stored

    def write_events(self, events: Sequence[Mapping[str, Any]]) -> int:
        """Insert clean events once per message_id; a known customer replaces an anonymous one.

        Two copies of an event in one batch keep each lineage step's earliest time, as locally;
        across batches the copy stored first keeps its own (one more DML per batch to compare
        them is not worth BigQuery's DML quota)."""
        stored_ms = _now_ms()
        rows: dict[str, dict[str, Any]] = {}
        for e in events:
            row = event_row(e, stored_ms)
            cur = rows.get(row["message_id"])
            if cur is None:
                rows[row["message_id"]] = row
                continue
            lineage = earliest_lineage(cur, row)
            if is_anonymous(cur["customer_id"]) and not is_anonymous(row["customer_id"]):
                rows[row["message_id"]] = cur = row
            cur.update(lineage)
        incoming = list(rows.values())
        already = {
            r["message_id"] for r in self._insert_once(EVENTS, incoming, date_column="event_date")
        }
        upgrades = [
            r for r in incoming if r["message_id"] in already and not is_anonymous(r["customer_id"])
        ]
        self._upgrade_attribution(self._pending_upgrades + upgrades)
        return stored_ms

    def _upgrade_attribution(self, rows: list[dict[str, Any]]) -> None:
        """Re-attribute stored anonymous events to their customer (see module docstring)."""
        self._pending_upgrades = []
        if not rows:
            return
        fields = ("message_id", "customer_id", "merged_from", "payload")
        param = bigquery.ArrayQueryParameter(
            "rows",
            "STRUCT",
            [
                bigquery.StructQueryParameter(
                    None, *(bigquery.ScalarQueryParameter(f, "STRING", r[f]) for f in fields)
                )
                for r in rows
            ],
        )
        sql = (
            "UPDATE `events` SET customer_id = u.customer_id, merged_from = u.merged_from, "
            "payload = u.payload FROM UNNEST(@rows) AS u "
            "WHERE events.message_id = u.message_id AND STARTS_WITH(events.customer_id, 'anon:')"
        )
        try:
            self.run(sql, [param], what="re-attribution of events")
        except StoreError as exc:
            if "streaming buffer" not in str(exc):
                raise
            log.info("re-attribution of %d events waits for the streaming buffer", len(rows))
            self._pending_upgrades = rows[-10_000:]

    def _merge(self, spec: TableSpec, rows: list[dict[str, Any]], order: str) -> None:
        sql = _merge_sql(spec, order)
        for chunk in _chunks(rows, self.settings.insert_batch_size):
            self.run(sql, [_struct_rows(spec, chunk)], what=f"merge into {spec.name}")

    def write_profiles(self, profiles: Iterable[Mapping[str, Any]]) -> int:
        """Upsert profiles on customer_id; an older version never overwrites a newer one."""
        stored = _now_ms()
        rows = _keep_latest((profile_row(p, stored) for p in profiles), "customer_id", "version")
        self._merge(PROFILES, rows, "version")
        return stored

    def write_dead_letters(self, failures: Sequence[Mapping[str, Any]]) -> int:
        """Insert dead letters once per input position (topic:partition:offset)."""
        stored = _now_ms()
        self._insert_once(DEAD_LETTERS, [dead_letter_row(f, stored) for f in failures])
        return stored

    def write_alerts(self, alerts: Sequence[Mapping[str, Any]]) -> int:
        """Insert anomaly alerts once per alert_id."""
        stored = _now_ms()
        self._insert_once(ALERTS, [alert_row(a, stored) for a in alerts])
        return stored

    def write_identity_links(self, links: Sequence[Mapping[str, Any]]) -> int:
        """Upsert anonymousId → customer links (latest link wins)."""
        stored = _now_ms()
        cols = IDENTITY_LINKS.column_names
        rows = [{c: link.get(c) for c in cols} | {"stored_ms": stored} for link in links]
        self._merge(IDENTITY_LINKS, _keep_latest(rows, "anonymous_id", "linked_ms"), "linked_ms")
        return stored

    def write_segment_changes(self, changes: Sequence[Mapping[str, Any]]) -> int:
        """Insert segment enter/exit records once per (customer, profile version, segment)."""
        stored = _now_ms()
        cols = SEGMENT_CHANGES.column_names
        rows = [{c: ch.get(c) for c in cols} | {"stored_ms": stored} for ch in changes]
        self._insert_once(SEGMENT_CHANGES, rows)
        return stored

    def write_sent_emails(self, emails: Sequence[Mapping[str, Any]]) -> int:
        """Insert sent e-mails once per email_id."""
        stored = _now_ms()
        rows = [sent_email_row(m, stored) for m in emails]
        self._insert_once(SENT_EMAILS, rows, date_column="sent_date")
        return stored

    def delete_customer(
        self, customer_keys: Sequence[str], anonymous_ids: Sequence[str], user_id: str
    ) -> dict[str, int]:
        """DML DELETE of every row about a customer (GDPR); returns rows deleted per table."""
        params = [
            _param(k, v) for k, v in _customer_params(customer_keys, anonymous_ids, user_id).items()
        ]
        deleted = {
            table: self.run(
                f"DELETE FROM `{table}` WHERE {cond}", params, what=f"forget in {table}"
            )
            for table, cond in _CUSTOMER_ROWS.items()
        }
        self.run(
            "UPDATE `identity_links` SET previous_customer_id = NULL "
            "WHERE previous_customer_id IN UNNEST(@keys)",
            params,
            what="forget in identity_links",
        )
        return deleted

    def count_customer_rows(
        self, customer_keys: Sequence[str], anonymous_ids: Sequence[str], user_id: str
    ) -> dict[str, int]:
        """Rows per table that still mention the customer (0 everywhere after forgetting):
        the rows :meth:`delete_customer` deletes, and links naming them as the previous one."""
        params = _customer_params(customer_keys, anonymous_ids, user_id)
        checks = dict(_CUSTOMER_ROWS)
        checks["identity_links"] += " OR previous_customer_id IN UNNEST(@keys)"
        return {
            t: int(self.scalar(f"SELECT COUNT(*) FROM `{t}` WHERE {cond}", params))
            for t, cond in checks.items()
        }
