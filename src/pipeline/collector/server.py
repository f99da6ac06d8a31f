"""Running the collector under uvicorn: in the foreground (`pipeline collect`) or in a thread."""

from __future__ import annotations

import logging

import uvicorn
from fastapi import FastAPI

from pipeline.collector.app import create_app
from pipeline.collector.config import DEV_WRITE_KEYS
from pipeline.collector.publish import KafkaPublisher
from pipeline.devkeys import warn_if_dev_key_exposed
from pipeline.gdpr import suppression_source
from pipeline.serving import RunningServer, start_in_thread
from pipeline.settings import Settings

log = logging.getLogger(__name__)


def kafka_app(settings: Settings, address: str) -> FastAPI:
    """The collector app producing to the broker at ``address``."""
    cfg = settings.collector
    warn_if_dev_key_exposed(
        "collector",
        cfg.host,
        cfg.write_keys,
        DEV_WRITE_KEYS["local"],
        "PIPELINE_COLLECTOR__WRITE_KEYS",
    )
    return create_app(
        settings,
        lambda: KafkaPublisher.connect(settings, address),
        suppressed=suppression_source(settings, address),  # forgotten on any machine
    )


def _server(settings: Settings, address: str) -> uvicorn.Server:
    cfg = settings.collector
    config = uvicorn.Config(
        kafka_app(settings, address),
        host=cfg.host,
        port=cfg.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        server_header=False,
    )
    return uvicorn.Server(config)


def serve(settings: Settings, address: str) -> None:
    """Run the collector in this thread until interrupted (Ctrl-C / SIGTERM)."""
    _server(settings, address).run()


def serve_in_thread(
    settings: Settings, address: str, *, ready_timeout_s: float = 15.0
) -> RunningServer:
    """Start the collector in a background thread once it accepts connections; return its stop
    (which waits for the acknowledgements in flight)."""
    return start_in_thread(
        _server(settings, address),
        "collector",
        ready_timeout_s=ready_timeout_s,
        stop_timeout_s=settings.collector.ack_timeout_s + 5,
    )
