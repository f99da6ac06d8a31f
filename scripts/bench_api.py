"""Latency of recommendations: the pure ``recommend()`` call, the service call (profile read
from the local store + recommend) and the HTTP endpoint (uvicorn on loopback, keep-alive).

Usage: ``python scripts/bench_api.py [--events 20000] [--requests 3000] [--k 10]``.
The warehouse is a fresh simulation replayed into a temporary directory. The timing helpers and
the HTTP measurement are shared with ``pipeline bench`` (:mod:`pipeline.bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.api.service import PersonalizationService
from pipeline.bench import BENCH_API_KEY, api_http_latencies, percentiles, timed
from pipeline.catalog import load_catalog
from pipeline.recommend import recommend
from pipeline.scoring import profile_from_dict
from pipeline.settings import Settings
from pipeline.simulate import SimulationConfig, simulate
from pipeline.stores.local import LocalWarehouse
from pipeline.testing import replay


def fill_warehouse(path: Path, events: int, seed: int) -> dict[str, dict[str, Any]]:
    """Simulate ``events`` messages ending now, replay them and write the local warehouse."""
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    catalog = load_catalog()
    sim = simulate(SimulationConfig(events, end=end, seed=seed), catalog)
    result = replay(
        [(m.key, m.value) for m in sim.messages],
        catalog=catalog,
        now_ms=int(end.timestamp() * 1000),
    )
    with LocalWarehouse(path) as wh:
        wh.write_events(result.events)
        wh.write_profiles(result.profiles.values())
    return result.profiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=3_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            _env_file=None,
            home=Path(tmp),
            api={"host": "127.0.0.1", "port": 0, "api_keys": {"bench": BENCH_API_KEY}},
        )
        started = time.perf_counter()
        profiles = fill_warehouse(settings.warehouse_path, args.events, args.seed)
        customers = sorted(c for c, p in profiles.items() if not p["is_anonymous"])
        rng = random.Random(args.seed)
        picks = [rng.choice(customers) for _ in range(args.requests)]
        setup_s = time.perf_counter() - started

        service = PersonalizationService(settings, background_refresh=False)
        signals = service.signals.get()
        catalog = service.catalog
        params = service.config.recommend
        parsed = {c: profile_from_dict(profiles[c]) for c in customers}
        at_ms = service.clock_ms()

        it = iter(picks * 2)
        pure = timed(
            lambda: recommend(
                parsed[next(it)], catalog, k=args.k, signals=signals, params=params, at_ms=at_ms
            ),
            args.requests,
        )
        it2 = iter(picks * 2)
        in_process = timed(lambda: service.recommendations(next(it2), args.k), args.requests)
        service.close()

        over_http = api_http_latencies(settings.home, picks, k=args.k, requests=args.requests)

    report = {
        "events": args.events,
        "customers": len(customers),
        "k": args.k,
        "setup_s": round(setup_s, 1),
        "recommend_pure": percentiles(pure),
        "store_read_plus_recommend": percentiles(in_process),
        "http_endpoint": percentiles(over_http),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
