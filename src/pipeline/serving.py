"""A uvicorn server run in a background thread: how `pipeline up` hosts the collector and API
beside the processor, and how tests start them."""

from __future__ import annotations

import threading
import time

import uvicorn

from pipeline.errors import PipelineError


class RunningServer:
    """A started server: call it to stop; ``url`` is where it listens (the real port if 0)."""

    def __init__(
        self, server: uvicorn.Server, thread: threading.Thread, url: str, stop_timeout_s: float
    ) -> None:
        self._server = server
        self._thread = thread
        self._stop_timeout_s = stop_timeout_s
        self.url = url

    def __call__(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=self._stop_timeout_s)


def start_in_thread(
    server: uvicorn.Server,
    what: str,
    *,
    ready_timeout_s: float,
    stop_timeout_s: float = 10.0,
) -> RunningServer:
    """Run ``server`` in a daemon thread named ``what``; return once it accepts connections."""
    thread = threading.Thread(target=server.run, name=what, daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout_s
    cfg = server.config
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout=5)
            raise PipelineError(f"{what} did not start on {cfg.host}:{cfg.port}")
        time.sleep(0.02)
    port = cfg.port
    for listener in server.servers:
        for sock in listener.sockets:
            port = int(sock.getsockname()[1])
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return RunningServer(server, thread, f"http://{host}:{port}", stop_timeout_s)
