"""How long a record waits between its producer and a caught-up consumer on the embedded broker,
by the consumer's ``fetch.wait.max.ms``: steady traffic, one partition, one consumer.

Kafka answers a fetch as soon as ``fetch.min.bytes`` (1) have arrived, so there the wait is
only an upper bound for an idle partition. Tansu held fetches for a share of the wait even
with records arriving every 1.25 ms (2026-11-29, 800 records/s: p50 127, 27, 7.8 and 4.8 ms
at 500, 100, 20 and 5 ms): each Kafka hop of the processor pays it on the embedded broker.

Usage: ``python scripts/probe_fetch_wait.py [--rate 800] [--seconds 4] [--waits 500,100,20,5]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.broker import EmbeddedBroker

WARM_UP = 200  # records read before the ones measured (the consumer's first fetches)


def produce_steadily(producer: Producer, topic: str, rate: float, stop: threading.Event) -> None:
    """Send the send time (monotonic seconds) as each record's value, ``rate`` a second."""
    sent, start = 0, time.monotonic()
    while not stop.is_set():
        producer.produce(topic, str(time.monotonic()).encode())
        producer.poll(0)
        sent += 1
        ahead = start + sent / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    producer.flush(10)


def probe(address: str, wait_ms: int, rate: float, seconds: float) -> dict[str, float]:
    """Produce ``rate`` records a second for ``seconds`` and time each until it is consumed."""
    topic = f"probe-{wait_ms}"
    admin = AdminClient({"bootstrap.servers": address})
    created = admin.create_topics([NewTopic(topic, 1, 1, config={"retention.ms": "600000"})])
    for done in created.values():
        done.result()
    consumer = Consumer(
        {
            "bootstrap.servers": address,
            "group.id": topic,
            "auto.offset.reset": "latest",
            "fetch.wait.max.ms": wait_ms,
            "session.timeout.ms": 6000,
        }
    )
    consumer.subscribe([topic])
    deadline = time.monotonic() + 30
    while not consumer.assignment() and time.monotonic() < deadline:
        consumer.poll(0.1)
    stop = threading.Event()
    producer = Producer({"bootstrap.servers": address, "linger.ms": 1})
    sender = threading.Thread(target=produce_steadily, args=(producer, topic, rate, stop))
    sender.start()
    waited: list[float] = []
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                waited.append((time.monotonic() - float(message.value())) * 1000)
    finally:
        stop.set()
        sender.join()
        consumer.close()
    q = statistics.quantiles(waited[WARM_UP:], n=100)
    return {
        "fetch_wait_max_ms": wait_ms,
        "records": len(waited) - WARM_UP,
        "p50_ms": round(q[49], 1),
        "p95_ms": round(q[94], 1),
        "p99_ms": round(q[98], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=800.0, help="records per second")
    parser.add_argument("--seconds", type=float, default=4.0, help="per fetch wait")
    parser.add_argument("--waits", default="500,100,20,5", help="fetch.wait.max.ms values")
    args = parser.parse_args()
    with EmbeddedBroker.start() as broker:
        for wait in (int(w) for w in args.waits.split(",")):
            print(json.dumps(probe(broker.address, wait, args.rate, args.seconds)))


if __name__ == "__main__":
    main()
