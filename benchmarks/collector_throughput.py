"""Collector throughput and acknowledgement latency: ``python benchmarks/collector_throughput.py``.

Starts an embedded broker and ``pipeline collect`` (one uvicorn worker, its own process), then
posts batches of ``--batch`` events from ``--connections`` concurrent HTTP connections for
``--seconds``; prints events/s, the p50/p99 time to the 200 (broker acknowledged) and the
collector's CPU use (events per CPU-second: the one-core figure when all share the cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime

import httpx
import orjson

from pipeline.broker import EmbeddedBroker, ensure_topics, free_port
from pipeline.settings import Settings

KEY = "wk_bench"


def _batch(n: int) -> bytes:
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    events = [
        {
            "type": "track",
            "event": "Product Viewed",
            "messageId": str(uuid.uuid4()),
            "anonymousId": str(uuid.uuid4()),
            "timestamp": now,
            "context": {
                "sessionId": "s_bench",
                "userAgent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:127.0) "
                "Gecko/20100101 Firefox/127.0",
                "library": {"name": "bench", "version": "1"},
            },
            "properties": {"product_id": "P00001", "price": 72.99, "category": "dresses"},
        }
        for _ in range(n)
    ]
    return orjson.dumps({"batch": events, "sentAt": now})


async def _load(url: str, batch: int, connections: int, seconds: float) -> tuple[int, list[float]]:
    latencies: list[float] = []
    events = 0
    deadline = time.monotonic() + seconds
    bodies = [_batch(batch) for _ in range(64)]

    async def worker(http: httpx.AsyncClient, i: int) -> None:
        nonlocal events
        while time.monotonic() < deadline:
            started = time.perf_counter()
            response = await http.post("/v1/batch", content=bodies[i % len(bodies)])
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text}")
            events += batch
            i += connections

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, auth=(KEY, ""), limits=limits) as http:
        await asyncio.gather(*(worker(http, i) for i in range(connections)))
    return events, latencies


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    settings = Settings(partitions=4)
    port = free_port()
    with EmbeddedBroker.start() as broker:
        ensure_topics(settings, broker.address)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")},
            "PIPELINE_BROKER": broker.address,
            "PIPELINE_COLLECTOR__PORT": str(port),
            "PIPELINE_COLLECTOR__WRITE_KEYS": json.dumps({"bench": KEY}),
            "PIPELINE_COLLECTOR__RATE_LIMIT_EVENTS_PER_S": "1e9",
            "PIPELINE_COLLECTOR__RATE_LIMIT_BURST": "1000000000",
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "collect"], env=env, stderr=subprocess.DEVNULL
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            asyncio.run(_load(url, args.batch, args.connections, 1.0))  # warm-up
            cpu_before = _cpu_seconds(server.pid)
            events, latencies = asyncio.run(_load(url, args.batch, args.connections, args.seconds))
            cpu_s = _cpu_seconds(server.pid) - cpu_before
        finally:
            server.terminate()
            server.wait(timeout=30)
    cuts = statistics.quantiles(latencies, n=100)
    print(
        json.dumps(
            {
                "batch": args.batch,
                "connections": args.connections,
                "seconds": args.seconds,
                "events_per_s": round(events / args.seconds),
                "requests": len(latencies),
                "ack_ms_p50": round(cuts[49] * 1000, 2),
                "ack_ms_p99": round(cuts[98] * 1000, 2),
                "collector_cpu_share": round(cpu_s / args.seconds, 2),
                "events_per_collector_cpu_s": round(events / cpu_s),
            }
        )
    )


if __name__ == "__main__":
    main()
