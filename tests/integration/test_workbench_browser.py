"""The workbench in a real browser while the real pipeline processes simulated traffic.

Starts `pipeline up`, the Streamlit server and system Chromium (driven by Playwright), sends
traffic with `pipeline simulate`, and saves screenshots under the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest
from browser import CHROMIUM, CHROMIUM_ARGS

from pipeline.broker import free_port
from pipeline.children import terminate
from pipeline.stores.local import LocalWarehouse

APP = Path(__file__).resolve().parents[2] / "workbench" / "app.py"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"no system Chromium at {CHROMIUM} (apt-get install -y chromium chromium-driver)",
    ),
    pytest.mark.timeout(300),
]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env["PIPELINE_HOME"] = str(home)
    env["PIPELINE_COMMIT_INTERVAL_S"] = "0.3"
    env["PIPELINE_API__PORT"] = "0"
    env["PIPELINE_METRICS_PORT"] = "0"
    env["PIPELINE_COLLECTOR__PORT"] = str(free_port())
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait(what: str, ready: Callable[[], Any], timeout_s: float, poll_s: float = 0.25) -> Any:
    """Poll ``ready`` until it returns something truthy; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _charts_drawn(page: Any, at_least: int, timeout_s: float = 60) -> None:
    """Wait until ``at_least`` plotly charts are drawn (the plotly bundle loads lazily)."""
    drawn = page.locator('[data-testid="stPlotlyChart"] .js-plotly-plot')
    _wait(f"{at_least} drawn charts", lambda: drawn.count() >= at_least, timeout_s)


def test_live_numbers_move_and_a_customer_opens(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    home = tmp_path / "home"
    shots = tmp_path / "screenshots"
    shots.mkdir()
    env = _env(home)
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[IO[bytes]] = []

    def start(name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{name}.log").open("wb")
        logs.append(log)
        proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    def logs_tail() -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in tmp_path.glob("*.log")
        )

    try:
        up = start("up", sys.executable, "-m", "pipeline", "up", "--no-workbench")
        _wait("pipeline up", lambda: (home / "broker.json").exists() or up.poll() is not None, 60)
        assert up.poll() is None, logs_tail()
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        start(
            "streamlit",
            sys.executable,
            "-m",
            "streamlit",
            "run",
            str(APP),
            "--server.headless",
            "true",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--server.fileWatcherType",
            "none",
            "--browser.gatherUsageStats",
            "false",
        )
        _wait("the Streamlit server", lambda: _healthy(url), 60)

        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 2600})
                page.goto(url)
                page.get_by_text("No pipeline data yet").wait_for(timeout=60_000)
                page.screenshot(path=str(shots / "live_empty.png"), full_page=True)

                simulate = start(
                    "simulate",
                    sys.executable,
                    "-m",
                    "pipeline",
                    "simulate",
                    "--events",
                    "3000",
                    "--rate",
                    # slow enough that the numbers still move when the page first shows one,
                    # however long a busy machine takes to draw it (500/s: done in 6 s)
                    "150",
                )
                stored = (
                    page.get_by_test_id("stMetric")
                    .filter(has_text="Events stored")
                    .get_by_test_id("stMetricValue")
                )

                def read_stored() -> int:
                    if stored.count() == 0:
                        return 0
                    return int(stored.first.inner_text(timeout=5_000).replace(",", ""))

                first = _wait("events on the Live page", read_stored, 90)
                page.screenshot(path=str(shots / "live_first.png"), full_page=True)
                second = _wait(
                    "the live numbers to change",
                    lambda: (n := read_stored()) != first and n,
                    60,
                )
                assert second > first, (first, second)
                _charts_drawn(page, 3)
                page.screenshot(path=str(shots / "live_second.png"), full_page=True)
                assert simulate.wait(timeout=120) == 0, logs_tail()

                with LocalWarehouse(home / "warehouse.sqlite", read_only=True) as wh:
                    customer = str(
                        wh.query(
                            "SELECT customer_id FROM profiles WHERE is_anonymous = 0 "
                            "AND merged_into IS NULL ORDER BY event_count DESC LIMIT 1"
                        )["customer_id"][0]
                    )
                    profile = wh.get_profile(customer)
                page.goto(f"{url}/customer?customer={customer}")
                page.get_by_text("Interaction score").wait_for(timeout=60_000)
                page.get_by_text("Identity graph").wait_for(timeout=30_000)
                body = page.inner_text("body")
                assert customer in body
                email = (profile.get("traits") or {}).get("email")
                if email:
                    assert email in body
                _charts_drawn(page, 4)
                page.screenshot(path=str(shots / "customer.png"), full_page=True)

                page.goto(f"{url}/email?customer={customer}&campaign=browser_check")
                page.get_by_text("Why these products").wait_for(timeout=60_000)
                subject = page.locator('[data-testid="stHeading"] h2').first.inner_text().strip()
                products = page.get_by_test_id("stTable")
                products.locator("tbody tr").first.wait_for(timeout=30_000)
                headers = [
                    h.strip().lower() for h in products.locator("thead th").all_inner_texts()
                ]
                assert "reason" in headers, headers
                first_row = products.locator("tbody tr").first.locator("th, td")
                reason = first_row.nth(headers.index("reason")).inner_text().strip()
                assert subject and reason, (subject, reason)
                inbox = page.frame_locator('iframe[title="Email preview"]')
                inbox.get_by_text(subject, exact=True).wait_for(timeout=30_000)
                rendered = inbox.frame_locator('iframe[title="Rendered email"]')
                rendered.get_by_text(reason, exact=True).first.wait_for(timeout=30_000)
                assert rendered.locator("title").text_content() == subject
                body = page.inner_text("body")
                assert "Send at (local)" in body and "browser_check" in body, body[:2000]
                page.screenshot(path=str(shots / "email.png"), full_page=True)

                page.goto(f"{url}/segments")
                page.get_by_text("Export CSV").wait_for(timeout=60_000)
                _charts_drawn(page, 2)
                page.screenshot(path=str(shots / "segments.png"), full_page=True)
                page.goto(f"{url}/quality")
                page.get_by_text("Schema versions seen").wait_for(timeout=60_000)
                _charts_drawn(page, 1)
                page.screenshot(path=str(shots / "quality.png"), full_page=True)
                assert "Traceback" not in page.inner_text("body")
            finally:
                browser.close()
        (tmp_path / "screenshots.json").write_text(
            json.dumps(sorted(p.name for p in shots.iterdir()))
        )
    finally:
        for proc in reversed(procs):
            terminate(proc, timeout_s=15)
        for log in logs:
            log.close()
    assert {p.name for p in shots.iterdir()} >= {"live_first.png", "customer.png", "email.png"}
