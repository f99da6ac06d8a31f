"""An event stored twice (anonymous, then re-attributed at a login) ends the same whichever
copy a store meets first: the known customer, and its first arrival's lineage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.stores.local import LocalWarehouse
from pipeline.stores.rows import earliest_lineage
from pipeline.testing import T0_MS, make_event

ANON = "anon:dev-1"


def _copies() -> tuple[dict[str, Any], dict[str, Any]]:
    """The anonymous copy (first arrival) and the re-attributed one (sent on at a login)."""
    first = make_event(message_id="m1", anonymous_id="dev-1", customer_id=ANON).to_dict()
    first.update(parsed_ms=T0_MS + 10, stitched_ms=T0_MS + 12, scored_ms=T0_MS + 15)
    again = {
        **first,
        "customer_id": "c1",
        "merged_from": ANON,
        "parsed_ms": T0_MS + 90_000,
        "stitched_ms": T0_MS + 90_001,
        "scored_ms": T0_MS + 90_004,
    }
    return first, again


def _row(path: Path, *writes: list[dict[str, Any]]) -> dict[str, Any]:
    with LocalWarehouse(path) as wh:
        for batch in writes:
            wh.write_events(batch)
        df = wh.query("SELECT * FROM events").drop(columns=["stored_ms"])
    assert len(df) == 1
    row: dict[str, Any] = df.iloc[0].to_dict()
    return row


@pytest.mark.parametrize("one_batch", [False, True])
def test_either_order_gives_the_same_row(tmp_path: Path, one_batch: bool) -> None:
    first, again = _copies()
    if one_batch:
        in_order = _row(tmp_path / "a.db", [first, again])
        reversed_ = _row(tmp_path / "b.db", [again, first])
    else:
        in_order = _row(tmp_path / "a.db", [first], [again])
        reversed_ = _row(tmp_path / "b.db", [again], [first])
    assert in_order == reversed_
    assert in_order["customer_id"] == "c1"
    assert in_order["merged_from"] == ANON
    assert '"c1"' in in_order["payload"]
    assert (in_order["parsed_ms"], in_order["stitched_ms"], in_order["scored_ms"]) == (
        T0_MS + 10,
        T0_MS + 12,
        T0_MS + 15,
    )


def test_a_replay_or_another_customer_keeps_the_attribution(tmp_path: Path) -> None:
    _, again = _copies()
    later = {**again, "customer_id": "c2", "parsed_ms": T0_MS + 1}  # not an upgrade
    row = _row(tmp_path / "w.db", [again], [again], [later])
    assert row["customer_id"] == "c1"
    assert row["parsed_ms"] == T0_MS + 1  # but an earlier step time is still the earliest
    assert row["stitched_ms"] == T0_MS + 90_001


def test_a_missing_step_time_is_filled_from_the_other_copy(tmp_path: Path) -> None:
    first, again = _copies()
    first["scored_ms"] = None
    row = _row(tmp_path / "w.db", [first], [again])
    assert row["scored_ms"] == T0_MS + 90_004
    assert earliest_lineage({"parsed_ms": None}, {"parsed_ms": None}) == dict.fromkeys(
        ("parsed_ms", "stitched_ms", "scored_ms")
    )


def test_the_anonymous_prefix_is_matched_case_sensitively(tmp_path: Path) -> None:
    """'ANON:42' is a known customer's id (only 'anon:' is reserved): an anonymous event merged
    into them is upgraded, and theirs is not taken for an anonymous one."""
    first, again = _copies()
    row = _row(tmp_path / "a.db", [first], [{**again, "customer_id": "ANON:42"}])
    assert row["customer_id"] == "ANON:42"
    row = _row(tmp_path / "b.db", [{**again, "customer_id": "Anon:7"}], [again])
    assert row["customer_id"] == "Anon:7"
