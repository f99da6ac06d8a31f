"""Soak test: run the real processor for N minutes at a fraction of its measured maximum load.

A short blast measures the maximum throughput; then events are offered at ``--fraction`` of it
(default half) for ``--minutes`` (default 10) while the processor's RSS, its lag (produced -
read) and its dead-letter rate are sampled. Writes ``soak.json`` and ``soak.html`` (memory over
time) under ``--out`` and prints whether memory stayed within ±10% after the warm-up.

Usage: ``python scripts/soak.py [--minutes 10] [--fraction 0.5] [--out reports/soak]``.
The processor runs in this process (the load generator is a thread beside it, its buffers
bounded by librdkafka); the embedded broker is another process, sampled too.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from pipeline.catalog import load_catalog
from pipeline.events import ms_to_iso
from pipeline.runner import Run, make_producer, pipeline_run, process_until_idle
from pipeline.settings import Settings

try:
    import psutil  # type: ignore[import-untyped]
except ImportError:  # psutil is optional: /proc is read instead
    psutil = None

FLAT_TOLERANCE = 0.10


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of ``pid`` (default: this process) via psutil, else /proc."""
    if psutil is not None:
        return int(psutil.Process(pid).memory_info().rss)
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc status")


class LoadGenerator:
    """Endless realistic raw messages: unique ids, devices that log in, ~0.5% malformed."""

    def __init__(self, product_ids: list[str], *, customers: int = 3000, seed: int = 1) -> None:
        self._rng = random.Random(seed)
        self._products = product_ids
        self._customers = customers
        self._n = 0

    def next(self) -> tuple[bytes, bytes]:
        """One (key, value) message timestamped now."""
        rng = self._rng
        self._n += 1
        c = rng.randrange(self._customers)
        device = f"soak-dev-{c}"
        if rng.random() < 0.005:
            return device.encode(), b'{"type":"track","messageId":"broken'
        event: dict[str, Any] = {
            "type": "track",
            "messageId": f"soak-{self._n}",
            "anonymousId": device,
            "timestamp": ms_to_iso(time.time_ns() // 1_000_000),
            "context": {"device": {"type": "server"}},
        }
        if rng.random() < 0.5:
            event["userId"] = f"soak-cus-{c}"
        roll = rng.random()
        product = rng.choice(self._products)
        if roll < 0.03:
            event.update(type="identify", userId=f"soak-cus-{c}", traits={"firstName": "Soak"})
        elif roll < 0.05:
            price = 20.0 + rng.random() * 80
            event["event"] = "Order Completed"
            event["properties"] = {
                "order_id": f"o-{self._n}",
                "revenue": round(price, 2),
                "currency": "EUR",
                "products": [{"product_id": product, "quantity": 1, "price": round(price, 2)}],
            }
        elif roll < 0.12:
            event["event"] = "Product Added"
            event["properties"] = {"product_id": product}
        else:
            event["event"] = "Product Viewed"
            event["properties"] = {"product_id": product}
        return device.encode(), orjson.dumps(event)


@dataclass
class Sample:
    """One reading taken during the soak."""

    t_s: float
    rss_mb: float
    broker_rss_mb: float | None
    produced: int
    processed: int
    lag: int
    dead_letters: int
    events_stored: int


def produce(run: Run, gen: LoadGenerator, count: int, rate: float | None, sent: list[int]) -> None:
    """Send ``count`` messages, paced at ``rate`` msg/s when given; ``sent[0]`` counts them."""
    producer = make_producer(run.settings, run.address)
    topic = run.settings.topics.raw
    start = time.monotonic()
    for i in range(count):
        if rate and i % 50 == 0:
            ahead = start + i / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        key, value = gen.next()
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.05)
        sent[0] += 1
        if i % 1000 == 999:
            producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("the broker did not acknowledge every soak message")


def measure_max(run: Run, gen: LoadGenerator, events: int) -> float:
    """Events per second the processor sustains when ``events`` are offered at once.

    Run first on a fresh run: it times from the first message read to the last one stored.
    """
    m = run.metrics
    sent = [0]
    process_until_idle(
        run,
        expected_raw=events,
        feed=lambda: produce(run, gen, events, None, sent),
        timeout_s=600,
    )
    assert m.first_in_s is not None and m.last_stored_s is not None
    return m.raw_in / (m.last_stored_s - m.first_in_s)


class Sampler:
    """Reads RSS, lag and dead letters every ``every_s`` seconds in a daemon thread."""

    def __init__(self, run: Run, sent: list[int], every_s: float) -> None:
        self.samples: list[Sample] = []
        self._run = run
        self._sent = sent
        self._every_s = every_s
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._base = (sent[0], run.metrics.raw_in, run.metrics.dead_lettered_total)
        self._thread = threading.Thread(target=self._loop, name="soak-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.take()

    def _loop(self) -> None:
        while not self._stop.wait(self._every_s):
            self.take()

    def take(self) -> None:
        m = self._run.metrics
        embedded = self._run.broker.embedded
        broker_rss = rss_bytes(embedded.process.pid) / 2**20 if embedded else None
        produced = self._sent[0] - self._base[0]
        processed = m.raw_in - self._base[1]
        self.samples.append(
            Sample(
                t_s=round(time.monotonic() - self._start, 2),
                rss_mb=round(rss_bytes() / 2**20, 1),
                broker_rss_mb=round(broker_rss, 1) if broker_rss is not None else None,
                produced=produced,
                processed=processed,
                lag=produced - processed,
                dead_letters=m.dead_lettered_total - self._base[2],
                events_stored=m.events_stored,
            )
        )


def flatness(samples: list[Sample], warmup_s: float) -> dict[str, Any]:
    """Whether RSS after the warm-up stayed within ±10% of its level right after the warm-up."""
    after = [s for s in samples if s.t_s >= warmup_s]
    if len(after) < 3:
        return {"flat": None, "reason": "fewer than 3 samples after the warm-up"}
    baseline = statistics.median(s.rss_mb for s in after[:3])
    deviations = [(s.rss_mb - baseline) / baseline for s in after]
    minutes = [s.t_s / 60 for s in after]
    slope = statistics.linear_regression(minutes, [s.rss_mb for s in after]).slope
    return {
        "flat": max(abs(d) for d in deviations) <= FLAT_TOLERANCE,
        "baseline_rss_mb": baseline,
        "min_rss_mb": min(s.rss_mb for s in after),
        "max_rss_mb": max(s.rss_mb for s in after),
        "max_deviation_pct": round(100 * max(deviations, key=abs), 2),
        "slope_mb_per_min": round(slope, 3),
    }


def write_chart(samples: list[Sample], path: Path, title: str, warmup_s: float) -> None:
    """Memory (processor and broker) and lag over time, as a standalone plotly HTML page."""
    from plotly.subplots import make_subplots

    t = [s.t_s / 60 for s in samples]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_scatter(x=t, y=[s.rss_mb for s in samples], name="processor RSS (MB)")
    if samples and samples[0].broker_rss_mb is not None:
        fig.add_scatter(x=t, y=[s.broker_rss_mb for s in samples], name="broker RSS (MB)")
    fig.add_scatter(
        x=t, y=[s.lag for s in samples], name="lag (messages)", secondary_y=True, mode="lines"
    )
    fig.add_vline(x=warmup_s / 60, line_dash="dot", annotation_text="end of warm-up")
    fig.update_layout(title=title, xaxis_title="minutes")
    fig.update_yaxes(title_text="MB", secondary_y=False)
    fig.update_yaxes(title_text="messages", secondary_y=True)
    fig.write_html(path, include_plotlyjs="cdn")


def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Measure the maximum, soak at a fraction of it and summarize."""
    catalog = load_catalog()
    gen = LoadGenerator(list(catalog), seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="soak-") as home:
        settings = Settings(_env_file=None, home=Path(home), partitions=args.partitions)
        with pipeline_run(settings) as run:
            max_rate = measure_max(run, gen, args.blast_events)
            rate = max_rate * args.fraction
            duration_s = args.minutes * 60
            count = int(rate * duration_s)
            print(f"max {max_rate:,.0f} events/s; offering {rate:,.0f}/s for {args.minutes} min")
            sent = [0]
            before_in = run.metrics.raw_in
            run.metrics.latencies_ms.clear()  # the soak's own latencies only
            with Sampler(run, sent, args.sample_s) as sampler:
                process_until_idle(
                    run,
                    expected_raw=before_in + count,
                    feed=lambda: produce(run, gen, count, rate, sent),
                    timeout_s=duration_s + 600,
                )
            m = run.metrics
            processed = m.raw_in - before_in
    samples = sampler.samples
    warmup_s = args.warmup_fraction * duration_s
    lags = [s.lag for s in samples]
    return {
        "config": {**vars(args), "out": str(args.out)},
        "max_events_per_s": round(max_rate, 1),
        "offered_events_per_s": round(rate, 1),
        "produced": sent[0],
        "processed": processed,
        "dead_letters": samples[-1].dead_letters if samples else 0,
        "dead_letter_rate": round(samples[-1].dead_letters / max(1, processed), 5)
        if samples
        else 0,
        "lag_max": max(lags, default=0),
        "lag_p95": sorted(lags)[int(0.95 * (len(lags) - 1))] if lags else 0,
        "lag_end": lags[-1] if lags else 0,
        "memory": flatness(samples, warmup_s),
        "broker_rss_mb": [samples[0].broker_rss_mb, samples[-1].broker_rss_mb] if samples else [],
        "latency_ms": m.latency_percentiles(),
        "samples": [asdict(s) for s in samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fraction", type=float, default=0.5, help="share of the maximum load")
    parser.add_argument("--blast-events", type=int, default=30_000)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--warmup-fraction", type=float, default=0.25)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("reports/soak"))
    args = parser.parse_args()
    report = soak(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(report, indent=1))
    title = (
        f"Soak: {report['offered_events_per_s']:,.0f} events/s "
        f"({args.fraction:.0%} of max) for {args.minutes:g} min"
    )
    write_chart(
        [Sample(**s) for s in report["samples"]],
        args.out / "soak.html",
        title,
        args.warmup_fraction * args.minutes * 60,
    )
    mem = report["memory"]
    summary = {k: v for k, v in report.items() if k not in ("samples", "config")}
    print(json.dumps(summary, indent=1))
    verdict = {True: "FLAT", False: "NOT FLAT", None: "UNKNOWN"}[mem["flat"]]
    print(f"memory after warm-up: {verdict} (±{FLAT_TOLERANCE:.0%}); report in {args.out}")


if __name__ == "__main__":
    main()
