"""`pipeline up`'s processor obeys a stop that came before its loop was running."""

from __future__ import annotations

import threading

import pytest

from pipeline.runner import _process_while_broker_lives, pipeline_run
from pipeline.settings import Settings

pytestmark = pytest.mark.integration


def test_a_stop_requested_before_the_loop_subscribed_still_stops_the_processor(
    settings: Settings,
) -> None:
    """quixstreams forgets an ``app.stop()`` (its SIGTERM handler's) that comes before
    ``run()`` has subscribed; `up` sees the signal itself (``StopSignals``) and stops the
    loop again until it obeys. Here the request is there before the loop starts at all."""
    stop = threading.Event()
    stop.set()
    died: list[bool] = []
    with pipeline_run(settings) as run:
        assert run.broker.embedded is not None
        # the safety net if the request were forgotten: the broker's death stops the loop,
        # and reports itself through on_broker_death
        safety = threading.Timer(90, run.broker.embedded.stop)
        safety.start()
        try:
            _process_while_broker_lives(run, on_broker_death=died.append, stop_requested=stop)
        finally:
            safety.cancel()
        assert run.broker.alive()
    assert died == [], "the processor ran on until its broker was stopped"
