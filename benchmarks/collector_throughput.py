"""Collector throughput and acknowledgement latency: ``python benchmarks/collector_throughput.py``.

A thin wrapper over :func:`pipeline.bench.collector_throughput` (also part of ``pipeline bench``):
starts an embedded broker and ``pipeline collect`` in its own process, posts batches of
``--batch`` events from ``--connections`` connections for ``--seconds`` and prints the JSON.
"""

from __future__ import annotations

import argparse
import json

from pipeline.bench import collector_throughput
from pipeline.broker import EmbeddedBroker, ensure_topics
from pipeline.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with EmbeddedBroker.start() as broker:
        ensure_topics(Settings(_env_file=None, partitions=4), broker.address)
        report = collector_throughput(
            broker.address, batch=args.batch, connections=args.connections, seconds=args.seconds
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
