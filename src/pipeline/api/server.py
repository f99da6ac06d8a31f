"""Running the API under uvicorn: in the foreground (`pipeline api`) or in a thread."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from pipeline.api.app import create_app
from pipeline.api.config import DEV_API_KEYS
from pipeline.devkeys import warn_if_dev_key_exposed
from pipeline.errors import PipelineError
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


class RunningApi:
    """A started API server: call it to stop; ``url`` is where it listens (real port if 0)."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, url: str) -> None:
        self._server = server
        self._thread = thread
        self.url = url

    def __call__(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def serve_api_in_thread(settings: Settings, *, ready_timeout_s: float = 30.0) -> RunningApi:
    """Start the API in a background thread once it accepts connections; return its stop."""
    server = _server(settings)
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout_s
    cfg = settings.api
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout=5)
            raise PipelineError(f"API did not start on {cfg.host}:{cfg.port}")
        time.sleep(0.02)
    port = cfg.port
    for listener in server.servers:
        for sock in listener.sockets:
            port = int(sock.getsockname()[1])
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return RunningApi(server, thread, f"http://{host}:{port}")
