"""The serving API's refreshing cache: first read builds, stale reads rebuild in the background."""

from __future__ import annotations

import threading

from pipeline.api.cache import Refreshing


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


def test_first_read_builds_then_value_is_reused_until_ttl() -> None:
    clock = Clock()
    builds = iter(range(100))
    cache = Refreshing("n", lambda: next(builds), 10.0, clock_ms=clock, background=False)
    assert cache.built_ms is None
    assert cache.get() == 0
    clock.now = 9_999
    assert cache.get() == 0 and cache.builds == 1
    clock.now = 10_000
    assert cache.get() == 0  # the stale value is served while it refreshes
    assert cache.get() == 1 and cache.builds == 2


def test_stale_reads_do_not_wait_for_the_background_rebuild() -> None:
    clock = Clock()
    release = threading.Event()
    values = iter(["first", "second"])

    def build() -> str:
        value = next(values)
        if value == "second":
            release.wait(5)
        return value

    cache = Refreshing("s", build, 1.0, clock_ms=clock)
    assert cache.get() == "first"
    clock.now = 5_000
    assert cache.get() == "first"  # rebuild started, old value served
    assert cache.get() == "first"  # only one rebuild runs
    release.set()
    cache.join(5)
    assert cache.get() == "second" and cache.builds == 2


def test_failed_rebuild_keeps_the_old_value() -> None:
    clock = Clock()
    calls = {"n": 0}

    def build() -> int:
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("store down")
        return 42

    cache = Refreshing("f", build, 1.0, clock_ms=clock, background=False)
    assert cache.get() == 42
    clock.now = 2_000
    assert cache.get() == 42 and cache.get() == 42
    assert calls["n"] == 2  # retried once per TTL, not per read
