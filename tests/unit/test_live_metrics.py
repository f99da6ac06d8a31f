"""The Live page's reading of the processor's and collector's ``/metrics``."""

from __future__ import annotations

import os
import subprocess
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from pipeline import workbench_data as wd
from pipeline.broker import free_port
from pipeline.collector.app import create_app as create_collector
from pipeline.collector.config import CollectorSettings
from pipeline.collector.publish import MemoryPublisher
from pipeline.metrics import SampledCpuClock, StreamMetrics, cpu_per_event
from pipeline.observability import exposition, metrics_registry, start_metrics_server
from pipeline.settings import Settings


def processor_text() -> str:
    m = StreamMetrics(
        raw_in=1200,
        duplicates_dropped=37,
        replays_dropped=2,
        dead_lettered=Counter({"invalid_json": 4, "schema": 9}),
    )
    m.step_cpu_s["parse"] += 0.06  # 50 us per event
    m.stored_cpu(0.012)  # 10 us per event
    m.request_reports = {
        "rdkafka#consumer-1": ("consumer", {"Fetch": 240, "Heartbeat": 6}),
        "rdkafka#producer-2": ("producer", {"Produce": 900}),
    }
    lag = {("events.raw", 1): 12, ("events.raw", 0): 30, ("events.attributed", 3): 1}
    return exposition(metrics_registry(m, lag=lambda: lag))


def test_processor_scrape_reads_counters_lag_and_dead_letters() -> None:
    scrape = wd.parse_processor_scrape(processor_text())
    assert (scrape.raw_in, scrape.duplicates_dropped, scrape.replays_dropped) == (1200, 37, 2)
    assert scrape.dead_lettered == {"invalid_json": 4, "schema": 9}
    assert scrape.consumer_lag_total == 43
    lag = scrape.lag_table()
    assert lag.to_dict("records") == [
        {"topic": "events.attributed", "partition": 3, "lag": 1},
        {"topic": "events.raw", "partition": 0, "lag": 30},
        {"topic": "events.raw", "partition": 1, "lag": 12},
    ]
    assert scrape.dead_letter_table()["reason"].tolist() == ["schema", "invalid_json"]
    cpu = dict(scrape.cpu_table().itertuples(index=False))
    assert cpu["parse"] == pytest.approx(50) and cpu["store"] == pytest.approx(10)
    assert cpu["fold"] == 0
    # the rest of this (test) process's CPU, per event; never below zero
    assert scrape.process_cpu_s is not None and scrape.process_cpu_s > 0
    assert cpu["framework"] == pytest.approx(max(0.0, scrape.process_cpu_s - 0.072) / 1200 * 1e6)
    # broker requests per 1,000 raw events, the most frequent first
    assert scrape.requests_table().values.tolist() == [
        ["producer", "Produce", 750.0],
        ["consumer", "Fetch", 200.0],
        ["consumer", "Heartbeat", 5.0],
    ]


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_processor_scrape_reads_the_embedded_brokers_memory_from_its_own_process() -> None:
    child = subprocess.Popen(["sleep", "30"])  # stands for the broker: another process
    try:
        text = exposition(metrics_registry(StreamMetrics(), broker_pid=child.pid))
        scrape = wd.parse_processor_scrape(text)
        # that process's memory (a few MB), not this test's (well over 50 MB)
        assert scrape.broker_memory_bytes is not None
        assert 0 < scrape.broker_memory_bytes < 50 * 2**20 < _rss_bytes(os.getpid())
    finally:
        child.kill()
        child.wait()
    # a processor on a real cluster exports none
    assert wd.parse_processor_scrape(processor_text()).broker_memory_bytes is None


def test_processor_scrape_of_a_fresh_processor_is_all_zero() -> None:
    scrape = wd.parse_processor_scrape(exposition(metrics_registry(StreamMetrics())))
    assert (scrape.raw_in, scrape.dead_lettered, scrape.consumer_lag) == (0, {}, {})
    assert set(scrape.step_cpu_s.values()) == {0.0}
    assert scrape.cpu_table().empty  # no events: no per-event figure
    assert scrape.requests_table().empty
    assert scrape.lag_table().empty and list(scrape.lag_table().columns) == [
        "topic",
        "partition",
        "lag",
    ]


def test_collector_scrape_reads_what_the_collector_app_serves(tmp_path: Path) -> None:
    keys = {"web": SecretStr("wk_live")}
    settings = Settings(_env_file=None, home=tmp_path, collector=CollectorSettings(write_keys=keys))
    track = {"type": "track", "event": "Signed Up", "messageId": "m1", "userId": "u1"}
    with TestClient(create_collector(settings, MemoryPublisher)) as http:
        http.post("/v1/track", json=track, auth=("wk_live", ""))
        http.post("/v1/track", json=track, auth=("wk_nope", ""))
        http.post("/v1/track", json=track, auth=("wk_nope", ""))
        http.post("/v1/track", json=track)
        text = http.get("/metrics").text
    scrape = wd.parse_collector_scrape(text)
    assert (scrape.events_accepted, scrape.events_produced) == (1, 1)
    assert scrape.rejected == {(401, "invalid_write_key"): 2, (401, "missing_write_key"): 1}
    assert scrape.rejection_table().to_dict("records")[0] == {
        "status": 401,
        "code": "invalid_write_key",
        "requests": 2,
    }


def test_text_that_is_not_an_exposition_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        wd.parse_processor_scrape("<html><body>not metrics</body></html>\n")


@pytest.mark.parametrize(
    ("host", "port", "url"),
    [
        ("127.0.0.1", 9108, "http://127.0.0.1:9108/metrics"),
        ("0.0.0.0", 8088, "http://127.0.0.1:8088/metrics"),
        ("::", 9108, "http://[::1]:9108/metrics"),
        ("fd00::5", 9108, "http://[fd00::5]:9108/metrics"),
        ("metrics.internal", 80, "http://metrics.internal:80/metrics"),
        ("127.0.0.1", 0, None),
    ],
)
def test_metrics_url(host: str, port: int, url: str | None) -> None:
    assert wd.metrics_url(host, port) == url


class Unavailable(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_error(503, "warming up")

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_read_metrics_from_a_running_endpoint_and_from_none() -> None:
    running = start_metrics_server(StreamMetrics(duplicates_dropped=5), "127.0.0.1", 0)
    try:
        text = wd.read_metrics(running.url)
    finally:
        running()
    assert text is not None and wd.parse_processor_scrape(text).duplicates_dropped == 5
    assert wd.read_metrics(running.url) is None  # stopped
    assert wd.read_metrics(f"http://127.0.0.1:{free_port()}/metrics") is None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert wd.read_metrics(f"http://127.0.0.1:{server.server_port}/metrics") is None
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_cpu_per_event_splits_the_process_cpu_into_steps_and_the_rest() -> None:
    steps = {"parse": 0.02, "fold": 0.05}
    assert cpu_per_event(steps, 1000) == {"parse": pytest.approx(20), "fold": pytest.approx(50)}
    with_process = cpu_per_event(steps, 1000, process_cpu_s=0.2)
    assert with_process["framework"] == pytest.approx(130)  # 0.2 s - 0.07 s, per event
    assert with_process["total"] == pytest.approx(200)
    assert cpu_per_event(steps, 1000, process_cpu_s=0.01)["framework"] == 0  # never below zero
    assert cpu_per_event(steps, 0) == {}


def test_the_sampled_cpu_clock_reads_one_message_in_n_scaled_by_n() -> None:
    """Each message's steps cost 1 ms of a fake thread clock: the sampled readings, scaled, sum
    to the CPU of all messages, and the clock is read for one message in four only."""
    reads = 0
    now = 0.0

    def read() -> float:
        nonlocal reads
        reads += 1
        return now

    clock = SampledCpuClock(every=4, read=read)
    counted = 0.0
    for _ in range(40):
        tick = clock.for_message()
        started = tick()
        now += 0.001  # the message's step
        counted += tick() - started
    assert counted == pytest.approx(0.040)
    assert reads == 2 * 10  # two readings for each of ten sampled messages
    with pytest.raises(ValueError):
        SampledCpuClock(every=0)
