"""CRM sync: incremental, idempotent re-runs, documented conflict resolution."""

from __future__ import annotations

import csv
import re
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pipeline.settings import Settings, SyncSettings
from pipeline.sync import (
    CRM_FIELDS,
    CRM_UPDATED_TRAIT,
    CrmRecord,
    SyncError,
    load_watermark,
    merge_crm_record,
    read_csv,
    sync_crm,
    sync_records,
)

SAMPLE = Path(__file__).resolve().parents[2] / "sample_data" / "crm_customers.csv"


class ListProducer:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []
        self.flushes = 0

    def send(self, key: str, value: dict[str, Any]) -> None:
        self.records.append((key, value))

    def flush(self) -> None:
        self.flushes += 1


def _settings(tmp_path: Path, **sync: Any) -> Settings:
    return Settings(home=tmp_path / "home", sync=SyncSettings(**sync))


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CRM_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def _row(cid: str, updated: str, **over: str) -> dict[str, str]:
    row = {
        "customer_id": cid,
        "email": f" {cid.upper()}@Example.com",
        "first_name": "Ann",
        "last_name": "Lee",
        "timezone": "Europe/Paris",
        "loyalty_tier": "gold",
        "email_consent": "true",
        "updated_at": updated,
    }
    return row | over


def test_sample_csv_imports_once(tmp_path: Path) -> None:
    settings = _settings(tmp_path, crm_csv_path=SAMPLE)
    first = ListProducer()
    [result] = sync_crm(settings, first)
    assert result.produced == len(first.records) > 100
    key, value = first.records[0]
    assert key == value["customer_id"] and value["source"] == "csv:crm_customers.csv"
    again = ListProducer()
    [rerun] = sync_crm(settings, again)
    assert rerun.produced == 0 and again.records == []
    assert load_watermark(settings, "csv:crm_customers.csv") == result.watermark


def test_only_changed_rows_are_produced(tmp_path: Path) -> None:
    path = tmp_path / "crm.csv"
    _write_csv(path, [_row("c1", "2024-01-01T00:00:00Z"), _row("c2", "2024-01-02T00:00:00Z")])
    settings = _settings(tmp_path, crm_csv_path=path)
    assert sync_crm(settings, ListProducer())[0].produced == 2
    _write_csv(
        path,
        [
            _row("c1", "2024-01-03T00:00:00+00:00", loyalty_tier="platinum"),
            _row("c2", "2024-01-02T00:00:00Z"),
        ],
    )
    producer = ListProducer()
    assert sync_crm(settings, producer)[0].produced == 1
    assert producer.records[0][1]["loyalty_tier"] == "platinum"
    assert producer.records[0][1]["email"] == "c1@example.com"


def _crm_table(db: Path, rows: list[dict[str, str]]) -> None:
    """Add ``rows`` to the CRM table ``customers`` of the SQLite file ``db`` (made if new)."""
    with sqlite3.connect(db) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS customers ({', '.join(CRM_FIELDS)})")
        conn.executemany(
            f"INSERT INTO customers VALUES ({', '.join('?' * len(CRM_FIELDS))})",
            [tuple(row.values()) for row in rows],
        )


def test_sqlite_source_with_watermark(tmp_path: Path) -> None:
    db = tmp_path / "crm.sqlite"
    _crm_table(db, [_row(f"c{i}", f"2024-02-0{i}T10:00:00+00:00") for i in (1, 2, 3)])
    settings = _settings(tmp_path, crm_csv_path=None, crm_sqlite_path=db)
    assert sync_crm(settings, ListProducer())[0].produced == 3
    assert sync_crm(settings, ListProducer())[0].produced == 0
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE customers SET email_consent = 'false', "
            "updated_at = '2024-03-01T00:00:00+00:00' WHERE customer_id = 'c2'"
        )
    producer = ListProducer()
    assert sync_crm(settings, producer)[0].produced == 1
    assert producer.records[0][1]["email_consent"] is False


def test_sqlite_rows_without_a_text_updated_at_are_reported_not_skipped(tmp_path: Path) -> None:
    db = tmp_path / "crm.sqlite"
    _crm_table(db, [_row(c, "2024-02-01T10:00:00+00:00") for c in ("c1", "c2", "c3")])
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE customers SET updated_at = NULL WHERE customer_id = 'c2'")
        conn.execute("UPDATE customers SET updated_at = 17 WHERE customer_id = 'c3'")
    conn.close()
    settings = _settings(tmp_path, crm_csv_path=None, crm_sqlite_path=db)
    producer = ListProducer()
    [result] = sync_crm(settings, producer)
    assert [key for key, _ in producer.records] == ["c1"]
    assert sorted(re.findall(r"c[23]", " ".join(result.rejected))) == ["c2", "c3"]


def test_a_bad_row_is_reported_by_source_and_customer_and_the_others_sync(
    tmp_path: Path,
) -> None:
    path = tmp_path / "crm.csv"
    far = "9999-12-31T23:00:00-05:00"  # past year 9999 in UTC: OverflowError, not ValueError
    rows = [_row("c9", "yesterday"), _row("c8", far), _row("c1", "2024-01-01T00:00:00Z")]
    _write_csv(path, rows)
    producer = ListProducer()
    [result] = sync_crm(_settings(tmp_path, crm_csv_path=path), producer)
    assert [key for key, _ in producer.records] == ["c1"]
    problem, far_off = result.rejected
    assert re.search(r"csv:crm\.csv.*c9", problem) and "c8" in far_off
    with pytest.raises(SyncError, match=r"csv:crm\.csv.*c9"):  # the same message, raised alone
        CrmRecord.parse(_row("c9", "yesterday"), "csv:crm.csv")


def test_a_crm_customer_id_in_the_anonymous_profiles_namespace_is_refused() -> None:
    with pytest.raises(SyncError, match=r"anon:d1.*reserved for anonymous profiles"):
        CrmRecord.parse(_row("anon:d1", "2024-01-01T00:00:00Z"), "csv:crm.csv")


def test_rows_saved_in_the_same_instant_as_the_watermark_are_not_skipped(tmp_path: Path) -> None:
    path = tmp_path / "crm.csv"
    same = "2024-01-01T10:00:00Z"
    _write_csv(path, [_row("c2", same)])
    settings = _settings(tmp_path, crm_csv_path=path)
    assert sync_crm(settings, ListProducer())[0].produced == 1
    # c1 was saved in the same second, after the first sync read the table: still new
    _write_csv(path, [_row("c2", same), _row("c1", same)])
    producer = ListProducer()
    assert sync_crm(settings, producer)[0].produced == 1
    assert [key for key, _ in producer.records] == ["c1"]
    assert sync_crm(settings, ListProducer())[0].produced == 0  # and neither is sent twice


def test_sqlite_rows_with_a_negative_utc_offset_are_not_skipped(tmp_path: Path) -> None:
    db = tmp_path / "crm.sqlite"
    _crm_table(db, [_row("c1", "2024-01-02T00:30:00+00:00")])
    settings = _settings(tmp_path, crm_csv_path=None, crm_sqlite_path=db)
    assert sync_crm(settings, ListProducer())[0].produced == 1
    # 01:00 UTC on the 2nd, written in New York's time
    _crm_table(db, [_row("c2", "2024-01-01T20:00:00-05:00")])
    producer = ListProducer()
    assert sync_crm(settings, producer)[0].produced == 1
    assert [key for key, _ in producer.records] == ["c2"]


def test_crm_consent_and_email_always_win_over_tracked_traits() -> None:
    tracked = {"email": "old@example.com", "emailConsent": True, "firstName": "Annie"}
    record = {
        "customer_id": "c1",
        "email": " New@Example.com",
        "email_consent": False,
        "first_name": "Ann",
        "loyalty_tier": "gold",
        "updated_at": "2024-01-01T00:00:00Z",
    }
    newer_tracking = int(datetime(2024, 6, 1, tzinfo=UTC).timestamp() * 1000)
    merged = merge_crm_record(tracked, record, traits_updated_ms=newer_tracking)
    assert merged["email"] == "new@example.com"
    assert merged["emailConsent"] is False
    assert merged["loyaltyTier"] == "gold"
    assert merged["firstName"] == "Annie"  # tracked traits are newer: CRM only fills gaps
    assert merge_crm_record(tracked, record)["firstName"] == "Ann"  # no newer tracking


def test_newest_crm_update_wins_and_stale_records_are_ignored() -> None:
    newer = {
        "customer_id": "c1",
        "loyalty_tier": "platinum",
        "email_consent": True,
        "updated_at": "2024-05-01T00:00:00+00:00",
    }
    older = {
        "customer_id": "c1",
        "loyalty_tier": "bronze",
        "email_consent": False,
        "updated_at": "2024-04-01T00:00:00+00:00",
    }
    traits = merge_crm_record({}, newer)
    assert merge_crm_record(traits, older) == traits
    assert traits[CRM_UPDATED_TRAIT] == "2024-05-01T00:00:00+00:00"
    assert merge_crm_record(traits, newer) == traits  # re-applying is a no-op


def test_empty_crm_field_never_erases() -> None:
    merged = merge_crm_record({"lastName": "Lee"}, {"last_name": "", "updated_at": "2024-01-01"})
    assert merged["lastName"] == "Lee"


def test_a_watermark_from_before_the_ids_were_kept_sends_nothing_twice(tmp_path: Path) -> None:
    import json

    path = tmp_path / "crm.csv"
    same = "2024-01-01T10:00:00+00:00"
    _write_csv(path, [_row("a", same), _row("b", same), _row("c", same), _row("d", same)])
    settings = _settings(tmp_path, crm_csv_path=path)
    mark = settings.home / "sync" / "csv_crm.csv.json"
    mark.parent.mkdir(parents=True)
    mark.write_text(json.dumps({"updated_at": same, "customer_id": "c"}))  # a, b, c were sent
    producer = ListProducer()
    assert sync_crm(settings, producer)[0].produced == 1
    assert [key for key, _ in producer.records] == ["d"]


def test_a_row_dated_in_the_future_is_rejected_and_holds_back_no_other(tmp_path: Path) -> None:
    """As the watermark, a row dated 2099 (a typo, a local time read as UTC) would hide every
    later change; as a customer's crmUpdatedAt, every CRM record for them until 2099."""
    path = tmp_path / "crm.csv"
    now = datetime(2024, 5, 1, 12, tzinfo=UTC)
    soon = "2024-05-01T12:04:00Z"  # within the clocks' skew: taken
    _write_csv(
        path,
        [
            _row("c1", "2024-05-01T10:00:00Z"),
            _row("c2", "2099-05-01T10:00:00Z"),
            _row("c3", "2024-05-01T13:00:00Z"),  # an hour ahead: taken once it is due
            _row("c4", soon),
        ],
    )
    settings = _settings(tmp_path, crm_csv_path=path)
    first = sync_records(settings, "csv:crm.csv", read_csv(path), ListProducer(), now=now)
    assert first.produced == 2 and first.watermark == ("2024-05-01T12:04:00+00:00", "c4")
    c2, c3 = first.rejected
    assert "csv:crm.csv: bad CRM row for c2: updated_at 2099-05-01T10:00:00+00:00" in c2
    assert "for c3:" in c3 and "is in the future" in c3
    _write_csv(
        path,
        [
            _row("c1", "2024-05-02T09:00:00Z", email_consent="false"),
            _row("c2", "2099-05-01T10:00:00Z"),
            _row("c3", "2024-05-01T13:00:00Z"),
            _row("c4", soon),
        ],
    )
    producer = ListProducer()
    later = datetime(2024, 5, 2, 10, tzinfo=UTC)
    second = sync_records(settings, "csv:crm.csv", read_csv(path), producer, now=later)
    assert [key for key, _ in producer.records] == ["c3", "c1"]
    assert producer.records[1][1]["email_consent"] is False
    assert len(second.rejected) == 1
    # the processor's check of a record on crm.customers goes through the same parse
    with pytest.raises(SyncError, match=r"c2.*in the future"):
        CrmRecord.parse(_row("c2", "2099-05-01T10:00:00Z"), "crm.customers")


def test_a_sqlite_source_whose_path_has_uri_characters_is_read(tmp_path: Path) -> None:
    folder = tmp_path / "crm #2?x=%41"
    folder.mkdir()
    db = folder / "crm.sqlite"
    _crm_table(db, [_row("c1", "2024-02-01T10:00:00+00:00")])
    settings = _settings(tmp_path, crm_csv_path=None, crm_sqlite_path=db)
    producer = ListProducer()
    assert sync_crm(settings, producer)[0].produced == 1
    assert [key for key, _ in producer.records] == ["c1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crm #2?x=%41", "home"]  # none made


def test_a_csv_export_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Spreadsheets save "CSV UTF-8" with a BOM: read as part of the first header, it made
    every row's customer_id empty, and every row was refused."""
    path = tmp_path / "crm.csv"
    _write_csv(path, [_row("c1", "2024-01-01T00:00:00Z")])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    producer = ListProducer()
    [result] = sync_crm(_settings(tmp_path, crm_csv_path=path), producer)
    assert [key for key, _ in producer.records] == ["c1"] and result.rejected == ()


def test_a_row_that_is_not_utf8_is_refused_and_the_others_sync(tmp_path: Path) -> None:
    """One name saved as Latin-1 stopped the whole sync (CSV: UnicodeDecodeError; SQLite: the
    query failed), nothing produced; now that row alone is refused, named."""
    path = tmp_path / "crm.csv"
    _write_csv(path, [_row("c1", "2024-01-01T00:00:00Z"), _row("c3", "2024-01-02T00:00:00Z")])
    lines = path.read_bytes().splitlines(keepends=True)
    latin1 = ",".join(_row("c2", "2024-01-01T12:00:00Z", first_name="René").values()) + "\n"
    path.write_bytes(b"".join([*lines[:2], latin1.encode("latin-1"), *lines[2:]]))
    db = tmp_path / "crm.sqlite"
    _crm_table(db, [_row(c, f"2024-01-0{n}T00:00:00Z") for n, c in ((1, "c1"), (2, "c3"))])
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO customers VALUES ('c2', 'c2@example.com', CAST(X'52656EE9' AS TEXT), "
            "'Lee', 'UTC', 'gold', 'true', '2024-01-01T12:00:00Z')"
        )
    conn.close()
    producer = ListProducer()
    csv_result, sqlite_result = sync_crm(
        _settings(tmp_path, crm_csv_path=path, crm_sqlite_path=db), producer
    )
    assert [key for key, _ in producer.records] == ["c1", "c3", "c1", "c3"]
    for result in (csv_result, sqlite_result):
        [problem] = result.rejected
        assert "bad CRM row for c2: first_name is not UTF-8 text" in problem
        assert result.watermark == ("2024-01-02T00:00:00+00:00", "c3")
