"""The local warehouse's batch(): a sink flush's writes to several tables commit as one."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import StoreError
from pipeline.stores.local import LocalWarehouse
from pipeline.testing import T0_MS, make_event


def _event(message_id: str) -> dict[str, object]:
    return make_event(message_id=message_id, user_id="c1", customer_id="c1").to_dict()


def _count(path: Path, table: str) -> int:
    with LocalWarehouse(path, read_only=True) as reader:
        return int(reader.scalar(f"SELECT COUNT(*) FROM {table}"))


def test_writes_in_a_batch_are_visible_together_at_its_end(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    with LocalWarehouse(path) as wh:
        with wh.batch():
            wh.write_events([_event("m1"), _event("m2")])
            link = {
                "anonymous_id": "d1",
                "customer_id": "c1",
                "previous_customer_id": None,
                "linked_ms": T0_MS,
                "via_message_id": "m1",
                "merged_events": 0,
            }
            wh.write_identity_links([link])
            # another connection (a reader: the API, the workbench) sees nothing yet
            assert _count(path, "events") == 0
            assert _count(path, "identity_links") == 0
        assert _count(path, "events") == 2
        assert _count(path, "identity_links") == 1


def test_a_failed_write_rolls_the_whole_batch_back(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    with LocalWarehouse(path) as wh:
        with pytest.raises(StoreError), wh.batch():
            wh.write_events([_event("m1")])
            wh.write_events([{**_event("m2"), "customer_id": None}])  # NOT NULL column
        assert _count(path, "events") == 0
        wh.write_events([_event("m3")])  # the connection is usable afterwards
        assert _count(path, "events") == 1
