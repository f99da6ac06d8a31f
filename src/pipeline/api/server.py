"""Running the API under uvicorn: in the foreground (`pipeline api`) or in a thread."""

from __future__ import annotations

import logging

import uvicorn

from pipeline.api.app import create_app
from pipeline.api.config import DEV_API_KEYS
from pipeline.devkeys import warn_if_dev_key_exposed
from pipeline.serving import RunningServer, start_in_thread
from pipeline.settings import Settings

log = logging.getLogger(__name__)


def _server(settings: Settings) -> uvicorn.Server:
    cfg = settings.api
    warn_if_dev_key_exposed(
        "API", cfg.host, cfg.api_keys, DEV_API_KEYS["local"], "PIPELINE_API__API_KEYS"
    )
    config = uvicorn.Config(
        create_app(settings),
        host=cfg.host,
        port=cfg.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        server_header=False,
    )
    return uvicorn.Server(config)


def serve_api(settings: Settings) -> None:
    """Run the API in this thread until interrupted (Ctrl-C / SIGTERM)."""
    _server(settings).run()


def serve_api_in_thread(settings: Settings, *, ready_timeout_s: float = 30.0) -> RunningServer:
    """Start the API in a background thread once it accepts connections; return its stop."""
    return start_in_thread(_server(settings), "API", ready_timeout_s=ready_timeout_s)
