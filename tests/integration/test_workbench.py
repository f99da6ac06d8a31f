"""Every workbench page under Streamlit's AppTest: with a filled warehouse, an empty one, none."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from pipeline import workbench_data as wd
from pipeline.api.service import PersonalizationService
from pipeline.catalog import load_catalog
from pipeline.settings import Settings
from pipeline.simulate import SimulationConfig, default_end, simulate
from pipeline.stores.local import LocalWarehouse
from pipeline.testing import make_dead_letter, make_event, replay

APP = Path(__file__).resolve().parents[2] / "workbench" / "app.py"
PAGES = (
    "views/live.py",
    "views/segments.py",
    "views/customer.py",
    "views/quality.py",
    "views/email.py",
)
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def filled_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pipeline home whose warehouse holds a replayed 1,500-message simulation."""
    home = tmp_path_factory.mktemp("filled")
    settings = Settings(home=home, _env_file=None)
    catalog = load_catalog(settings.catalog_path)
    sim = simulate(SimulationConfig(events=1500, seed=3, end=default_end()), catalog)
    result = replay([(m.key, m.value) for m in sim.messages], catalog=catalog, settings=settings)
    with LocalWarehouse(settings.warehouse_path) as wh:
        wh.write_events(result.events)
        wh.write_profiles(result.profiles.values())
        wh.write_dead_letters([f.to_dict() for f in result.failures])
        wh.write_identity_links(
            [{k: v for k, v in link.items() if k != "kind"} for link in result.links]
        )
    return home


@pytest.fixture
def use_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """Isolate settings (no stray PIPELINE_* or .env) and Streamlit's process-wide caches."""
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("PIPELINE_")]:
        monkeypatch.delenv(key)
    st.cache_data.clear()
    st.cache_resource.clear()
    yield monkeypatch
    st.cache_data.clear()
    st.cache_resource.clear()


def _run(page: str, query: dict[str, str] | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT_S)
    at.query_params.update(query or {})
    at.run()
    if page != PAGES[0]:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _frame(at: AppTest, column: str) -> pd.DataFrame:
    """The first table on the page that has ``column``."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def _metric(at: AppTest, label: str) -> str:
    return next(str(m.value) for m in at.metric if m.label == label)


@pytest.mark.parametrize("page", PAGES)
def test_page_without_warehouse_says_how_to_start(
    page: str, use_home: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_home.setenv("PIPELINE_HOME", str(tmp_path / "nothing-yet"))
    at = _run(page)
    assert any("pipeline up" in i.value for i in at.info)
    assert any("pipeline simulate --events 10000" in c.value for c in at.code)
    assert not (tmp_path / "nothing-yet").exists()  # the workbench never creates stores


@pytest.mark.parametrize("page", PAGES)
def test_page_with_empty_warehouse_says_how_to_start(
    page: str, use_home: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    LocalWarehouse(Settings(home=home, _env_file=None).warehouse_path).close()
    use_home.setenv("PIPELINE_HOME", str(home))
    at = _run(page)
    assert any("pipeline up" in i.value for i in at.info)
    assert not at.metric


def test_live_page_shows_totals_and_charts(use_home: pytest.MonkeyPatch, filled_home: Path) -> None:
    use_home.setenv("PIPELINE_HOME", str(filled_home))
    at = _run("views/live.py")
    with LocalWarehouse(filled_home / "warehouse.sqlite", read_only=True) as wh:
        counts = wh.counts()
    assert _metric(at, "Events stored") == f"{counts['events']:,}"
    assert _metric(at, "Dead letters") == f"{counts['dead_letters']:,}"
    assert _metric(at, "Identity links") == f"{counts['identity_links']:,}"
    assert float(_metric(at, "Events/s in")) >= 0
    assert len(at.get("plotly_chart")) >= 3
    assert not at.info


def test_a_store_started_over_while_the_workbench_runs_is_read_afresh(
    use_home: pytest.MonkeyPatch, filled_home: Path, tmp_path: Path
) -> None:
    """`rm -rf` the home and a new `pipeline demo` while the workbench runs: its cached handle
    must not go on reading the deleted file (it did until Streamlit restarted)."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(filled_home / "warehouse.sqlite", home / "warehouse.sqlite")
    use_home.setenv("PIPELINE_HOME", str(home))
    assert _metric(_run("views/live.py"), "Events stored") != "1"
    for leftover in home.iterdir():
        leftover.unlink()
    with LocalWarehouse(home / "warehouse.sqlite") as wh:
        wh.write_events([make_event(ingested_ms=wd.now_ms()).to_dict()])
    st.cache_data.clear()  # what the queries' few seconds of TTL do by themselves
    assert _metric(_run("views/live.py"), "Events stored") == "1"


def test_segments_page_with_only_anonymous_visitors_says_so(
    use_home: pytest.MonkeyPatch, filled_home: Path, tmp_path: Path
) -> None:
    import sqlite3

    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(filled_home / "warehouse.sqlite", home / "warehouse.sqlite")
    with sqlite3.connect(home / "warehouse.sqlite") as conn:
        conn.execute("DELETE FROM profiles WHERE is_anonymous = 0")
    use_home.setenv("PIPELINE_HOME", str(home))
    at = _run("views/segments.py")
    assert any("No signed-in customers yet" in i.value for i in at.info)
    assert not any("pipeline up" in i.value for i in at.info)  # it is not an empty store
    at.toggle(key="seg_anon").set_value(True).run()
    assert not at.exception
    assert len(_frame(at, "score")) > 0


def test_segments_page_with_only_dead_letters_points_to_data_quality(
    use_home: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    with LocalWarehouse(home / "warehouse.sqlite") as wh:
        wh.write_dead_letters([make_dead_letter(0, "{not json")])
    use_home.setenv("PIPELINE_HOME", str(home))
    for anonymous in (False, True):
        at = _run("views/segments.py")
        if anonymous:
            at.toggle(key="seg_anon").set_value(True).run()
        assert not at.exception
        shown = " ".join(i.value for i in at.info)
        assert "No profiles yet" in shown and "Data quality" in shown
        assert "anonymous visitor" not in shown and "pipeline up" not in shown


def test_segments_page_lists_members_and_exports(
    use_home: pytest.MonkeyPatch, filled_home: Path
) -> None:
    use_home.setenv("PIPELINE_HOME", str(filled_home))
    at = _run("views/segments.py")
    stage_metrics = {m.label for m in at.metric}
    assert {"Browsing", "Cart", "Purchased", "Lapsed"} <= stage_metrics
    members = at.dataframe[0].value
    assert len(members) > 0 and {"customer_id", "score", "intent_stage"} <= set(members.columns)
    assert len(at.get("download_button")) == 1
    assert len(at.get("plotly_chart")) == 2

    at.multiselect(key="seg_stages").set_value(["browsing"]).run()
    assert not at.exception
    filtered = at.dataframe[0].value
    assert set(filtered["intent_stage"].astype(str)) <= {"browsing"}
    at.slider(key="seg_score").set_range(90.0, 100.0).run()
    assert (at.dataframe[0].value["score"] >= 90.0).all()


def test_customer_page_searches_and_shows_360(
    use_home: pytest.MonkeyPatch, filled_home: Path
) -> None:
    use_home.setenv("PIPELINE_HOME", str(filled_home))
    at = _run("views/customer.py")
    top = at.selectbox(key="cust_pick").value
    assert top is not None and top.startswith("cus_")
    assert at.header[0].value
    assert {"Interaction score", "Intent stage", "Revenue"} <= {m.label for m in at.metric}
    assert len(at.get("plotly_chart")) >= 3

    with LocalWarehouse(filled_home / "warehouse.sqlite", read_only=True) as wh:
        linked = wh.query(
            "SELECT anonymous_id, customer_id FROM identity_links ORDER BY anonymous_id LIMIT 1"
        ).iloc[0]
    at.text_input(key="cust_search").input(str(linked["anonymous_id"])[:8]).run()
    assert not at.exception
    assert at.selectbox(key="cust_pick").value == linked["customer_id"]
    identities = _frame(at, "provenance")
    assert linked["anonymous_id"] in set(identities["anonymous_id"])
    assert identities["provenance"].str.contains("identity link").any()

    at.text_input(key="cust_search").input("no-such-customer").run()
    assert not at.exception
    assert any("No customer matches" in w.value for w in at.warning)


def test_customer_page_opens_a_deep_link(use_home: pytest.MonkeyPatch, filled_home: Path) -> None:
    use_home.setenv("PIPELINE_HOME", str(filled_home))
    with LocalWarehouse(filled_home / "warehouse.sqlite", read_only=True) as wh:
        cid = str(
            wh.query("SELECT customer_id FROM profiles ORDER BY cis LIMIT 1")["customer_id"][0]
        )
    at = _run("views/customer.py", {"customer": cid})
    assert at.selectbox(key="cust_pick").value == cid
    assert cid in _shown(at.caption[0].value)


def test_quality_page_shows_dead_letters_and_schema_versions(
    use_home: pytest.MonkeyPatch, filled_home: Path
) -> None:
    use_home.setenv("PIPELINE_HOME", str(filled_home))
    at = _run("views/quality.py")
    reasons = _frame(at, "dead_letters")
    assert reasons["dead_letters"].sum() > 0
    assert _frame(at, "schema_version")["events"].sum() > 0
    reason = str(reasons["reason"].iloc[0])
    at.selectbox(key="dq_reason").select(reason).run()
    assert not at.exception
    assert set(_frame(at, "raw_text")["reason"]) == {reason}


def _email_frame(at: AppTest) -> str:
    """The rendered email's document as the browser gets it, entities decoded."""
    (frame,) = at.get("iframe")
    outer: str = frame.proto.srcdoc
    assert 'sandbox="allow-popups allow-popups-to-escape-sandbox"' in outer
    assert "allow-scripts" not in outer and "allow-same-origin" not in outer
    return html.unescape(html.unescape(outer))


def _shown(markdown: str) -> str:
    """The text a header or caption shows: visitors' text reaches Streamlit escaped
    (workbench_data.plain), and Markdown drops the backslashes."""
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", markdown)


def _assert_preview(at: AppTest, customer_id: str, campaign: str) -> dict[str, Any]:
    """One coherent preview: subject, reasons, send time, plain text and snapshot agree."""
    assert not at.exception, [e.value for e in at.exception]
    subject = _shown(at.header[0].value)
    document = _email_frame(at)
    text = at.code[0].value
    assert subject and subject in document
    products = at.table[0].value
    assert list(products.columns) == ["name", "reason", "source"]
    assert len(products) > 0 and (products["reason"].str.len() > 0).all()
    for reason in products["reason"]:
        assert reason in document and reason in text
    assert {"Send at (local)", "Send at (UTC)", "Confidence", "Fallback"} <= {
        m.label for m in at.metric
    }
    assert _metric(at, "Fallback") in {"yes", "no"}
    snapshot: dict[str, Any] = json.loads(at.json[0].value)
    assert snapshot["customer_id"] == customer_id and snapshot["campaign_id"] == campaign
    assert [r["reason"] for r in snapshot["recommendations"]] == list(products["reason"])
    assert {"send_at_ms", "timezone", "confidence", "fallback"} <= set(snapshot["send_time"])
    return snapshot


def test_email_page_previews_a_customer(use_home: pytest.MonkeyPatch, filled_home: Path) -> None:
    use_home.setenv("PIPELINE_HOME", str(filled_home))
    at = _run("views/email.py")
    chosen = at.selectbox(key="email_pick").value
    assert chosen is not None and chosen.startswith("cus_")
    _assert_preview(at, chosen, "preview")
    assert at.query_params["customer"] in (chosen, [chosen])

    at.text_input(key="email_campaign").input("spring_sale").run()
    _assert_preview(at, chosen, "spring_sale")
    assert "utm_campaign=spring_sale" in _email_frame(at)
    assert any("delivery key pl-" in _shown(c.value) for c in at.caption)  # one per customer
    at.text_input(key="email_campaign").input("cart_abandonment").run()
    _assert_preview(at, chosen, "cart_abandonment")  # sent under each trigger's own key
    assert any("delivery key one per trigger occurrence" in _shown(c.value) for c in at.caption)

    at.text_input(key="email_search").input("no-such-customer").run()
    assert not at.exception
    assert any("No customer matches" in w.value for w in at.warning)
    assert not at.get("iframe")


def test_email_page_opens_a_deep_link(use_home: pytest.MonkeyPatch, filled_home: Path) -> None:
    use_home.setenv("PIPELINE_HOME", str(filled_home))
    with LocalWarehouse(filled_home / "warehouse.sqlite", read_only=True) as wh:
        cid = str(
            wh.query(
                "SELECT customer_id FROM profiles WHERE merged_into IS NULL ORDER BY cis LIMIT 1"
            )["customer_id"][0]
        )
    at = _run("views/email.py", {"customer": cid, "campaign": "winter"})
    assert at.selectbox(key="email_pick").value == cid
    _assert_preview(at, cid, "winter")

    missing = _run("views/email.py", {"customer": "cus_nobody"})
    assert any("cus_nobody" in e.value for e in missing.error)
    assert not missing.get("iframe")


def test_email_page_previews_a_segment(use_home: pytest.MonkeyPatch, filled_home: Path) -> None:
    use_home.setenv("PIPELINE_HOME", str(filled_home))
    service = PersonalizationService(
        Settings(home=filled_home, _env_file=None), background_refresh=False
    )
    try:
        _, sizes = service.segment_sizes()
    finally:
        service.close()
    full = next(rule.name for rule, n in sizes if n > 0)
    empty = [rule.name for rule, n in sizes if n == 0]

    at = _run("views/email.py", {"segment": full, "campaign": "vip_weekend"})
    assert at.radio(key="email_mode").value == "Segment"
    assert at.selectbox(key="email_segment").value == full
    table = _frame(at, "send_at_utc")
    assert len(table) > 0 and (table["subject"].str.len() > 0).all()
    assert {"to", "send_at_local", "confidence", "fallback"} <= set(table.columns)
    assert list(table["preview"]) == [
        f"/email?customer={c}&campaign=vip_weekend" for c in table["customer_id"]
    ]
    first = table.iloc[0]
    assert at.selectbox(key="email_member").value == first["customer_id"]
    _assert_preview(at, str(first["customer_id"]), "vip_weekend")
    assert _shown(at.header[0].value) == first["subject"]

    if empty:
        at.selectbox(key="email_segment").set_value(empty[0]).run()
        assert not at.exception
        assert any("right now" in i.value for i in at.info)
        assert not at.get("iframe")

    at.radio(key="email_mode").set_value("Customer").run()
    assert not at.exception and at.get("iframe")
    assert "segment" not in at.query_params


def _array(value: Any) -> list[Any]:
    """A plotly figure's array as a list (plotly writes numbers as base64 typed arrays)."""
    if isinstance(value, dict):
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).tolist()
    return list(value)


def test_live_page_reads_the_processor_and_collector_metrics_endpoints(
    use_home: pytest.MonkeyPatch, filled_home: Path
) -> None:
    """Real /metrics endpoints on free loopback ports; once they stop, the page says so."""
    from collections import Counter

    from prometheus_client import start_http_server

    from pipeline.broker import EmbeddedBroker
    from pipeline.metrics import StreamMetrics
    from pipeline.observability import CollectorMetrics, start_metrics_server

    def partition(n: int, position: int, high_watermark: int) -> dict[str, Any]:
        return {
            "partition": n,
            "fetch_state": "active",
            "app_offset": position,
            "stored_offset": -1001,
            "committed_offset": -1001,
            "hi_offset": high_watermark,
            "consumer_lag": -1,
        }

    stats = {
        "name": "rdkafka#consumer-1",
        "type": "consumer",
        "topics": {
            "events.raw": {"partitions": {"0": partition(0, 90, 100), "1": partition(1, 40, 47)}}
        },
        "brokers": {"127.0.0.1:9092/1": {"req": {"Fetch": 500, "Heartbeat": 20}}},
    }
    metrics = StreamMetrics(
        raw_in=2000,
        duplicates_dropped=1234,
        dead_lettered=Counter({"invalid_json": 3, "schema": 5}),
    )
    metrics.on_consumer_stats(json.dumps(stats))
    metrics.step_cpu_s["fold"] += 0.2  # 100 us per raw event
    collector = CollectorMetrics()
    collector.events_accepted.inc(500)
    collector.rejected(401, "invalid_write_key")
    collector.rejected(401, "invalid_write_key")
    collector.rejected(429, "rate_limited")

    broker = EmbeddedBroker.start()  # a real one: the page shows its memory
    processor = start_metrics_server(metrics, "127.0.0.1", 0, broker_pid=broker.process.pid)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=collector.registry)
    try:
        use_home.setenv("PIPELINE_HOME", str(filled_home))
        use_home.setenv("PIPELINE_METRICS_PORT", str(processor.port))
        use_home.setenv("PIPELINE_COLLECTOR__PORT", str(server.server_port))
        at = _run("views/live.py")
        with open(f"/proc/{broker.process.pid}/status") as status:
            rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    finally:
        processor()
        broker.stop()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    [memory] = [c.value for c in at.caption if c.value.startswith("Embedded broker memory")]
    shown = float(memory.split(": ")[1].split(" MiB")[0].replace(",", ""))
    assert shown == pytest.approx(rss / 1024, abs=8), (memory, rss)  # MiB; this test: >100
    assert _metric(at, "Duplicates dropped") == "1,234"
    assert _metric(at, "Consumer lag") == "17"
    assert _metric(at, "Dead-lettered (processor)") == "8"
    assert _frame(at, "lag").to_dict("records") == [
        {"topic": "events.raw", "partition": 0, "lag": 10},
        {"topic": "events.raw", "partition": 1, "lag": 7},
    ]
    assert _frame(at, "dead_lettered").to_dict("records") == [
        {"reason": "schema", "dead_lettered": 5},
        {"reason": "invalid_json", "dead_lettered": 3},
    ]
    assert _frame(at, "code").to_dict("records") == [
        {"status": 401, "code": "invalid_write_key", "requests": 2},
        {"status": 429, "code": "rate_limited", "requests": 1},
    ]
    assert _frame(at, "per_1k_events").to_dict("records") == [
        {"client": "consumer", "request": "Fetch", "per_1k_events": 250.0},
        {"client": "consumer", "request": "Heartbeat", "per_1k_events": 10.0},
    ]
    assert not any("not reachable" in c.value for c in at.caption)
    [cpu_chart] = [c for c in at.get("plotly_chart") if "CPU" in c.proto.spec]
    bars = json.loads(cpu_chart.proto.spec)["data"][0]
    by_step = dict(zip(_array(bars["y"]), _array(bars["x"]), strict=True))
    assert by_step["fold"] == pytest.approx(100) and by_step["parse"] == 0
    assert by_step["framework"] > 0  # the rest of this test process's CPU

    st.cache_data.clear()
    at = _run("views/live.py")
    captions = [c.value for c in at.caption]
    assert f"Processor metrics not reachable at {processor.url}." in captions
    collector_url = f"http://127.0.0.1:{server.server_port}/metrics"
    assert f"Collector metrics not reachable at {collector_url}." in captions
    assert not any(m.label == "Duplicates dropped" for m in at.metric)
    assert _metric(at, "Events stored")  # the warehouse figures are still shown


def test_alerts_page_says_no_open_alerts(use_home: pytest.MonkeyPatch, filled_home: Path) -> None:
    use_home.setenv("PIPELINE_HOME", str(filled_home))
    at = _run("views/alerts.py")
    assert any(s.value == "No open alerts" for s in at.success)
    assert not at.dataframe


def test_alerts_page_lists_open_alerts(use_home: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pipeline.anomaly import Alert, alert_record
    from pipeline.events import Failure

    home = tmp_path / "alerting"
    now = 1_800_000_000_000
    with LocalWarehouse(Settings(home=home, _env_file=None).warehouse_path) as wh:
        wh.write_dead_letters([Failure.of("not_json", "x", b"{", ingested_ms=now).to_dict()])
        wh.write_alerts(
            [
                alert_record(Alert("volume_spike", "Product Viewed/web", 90, 4, "critical", now)),
                alert_record(Alert("bot_identity", "bot-1", 120, 60, "warning", now - 60_000)),
                alert_record(Alert("clock_skew", "kiosk", 7e6, 3e5, "critical", now - 40 * 60_000)),
            ]
        )
    use_home.setenv("PIPELINE_HOME", str(home))
    at = _run("views/alerts.py")
    table = _frame(at, "subject")
    assert list(table["subject"]) == ["Product Viewed/web", "bot-1"]  # the skew is 40 min old
    assert list(table["severity"]) == ["critical", "warning"]
    assert {"kind", "observed", "expected", "at"} <= set(table.columns)
    assert _metric(at, "Open alerts") == "2"
    at.number_input(key="al_window").set_value(60).run()
    assert not at.exception
    assert set(_frame(at, "subject")["subject"]) == {"Product Viewed/web", "bot-1", "kiosk"}


@pytest.mark.parametrize("made", [False, True])
def test_alerts_page_empty_states(made: bool, use_home: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = tmp_path / "home"
    if made:
        LocalWarehouse(Settings(home=home, _env_file=None).warehouse_path).close()
    use_home.setenv("PIPELINE_HOME", str(home))
    at = _run("views/alerts.py")
    assert any("pipeline up" in i.value for i in at.info)
