"""A local BigQuery emulator (bqemulator, DuckDB-backed) in a child process, for the tests.

Run as a script it applies the two patches the emulator needs offline and serves until
SIGTERM: its start-up ``INSTALL spatial`` would download an extension (a failure is ignored
here: GEOGRAPHY is unused), and the client sends small load jobs as ``*/*``, which it refuses.
A child process keeps DuckDB, gRPC and the patches out of the test process.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.children import terminate


def _serve(port: int) -> None:
    from bqemulator.api.routes import upload
    from bqemulator.config import PersistenceMode, Settings
    from bqemulator.server import run_forever
    from bqemulator.storage.engine import DuckDBEngine

    load_spatial = DuckDBEngine._load_spatial

    def load_spatial_if_present(self: DuckDBEngine) -> None:
        with contextlib.suppress(Exception):
            load_spatial(self)

    DuckDBEngine._load_spatial = load_spatial_if_present  # type: ignore[method-assign]
    upload._PERMITTED_MEDIA_CONTENT_TYPES = (*upload._PERMITTED_MEDIA_CONTENT_TYPES, "*/*")
    run_forever(
        Settings(
            rest_host="127.0.0.1",
            rest_port=port,
            grpc_host="127.0.0.1",
            grpc_port=0,
            persistence_mode=PersistenceMode.EPHEMERAL,
            enable_format_extensions=False,
        )
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_emulator(timeout_s: float = 60.0) -> Iterator[str]:
    """Start the emulator on a free loopback port; yields its endpoint URL; stops it after."""
    port = _free_port()
    env = {**os.environ, "BQEMU_ENABLE_FORMAT_EXTENSIONS": "false", "BQEMU_LOG_LEVEL": "warning"}
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - outlives this block, closed below
        prefix="bqemulator-", suffix=".log", delete=False
    )
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"bqemulator exited ({proc.returncode}): {Path(log.name).read_text()[-2000:]}"
                )
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bqemulator not listening after {timeout_s:.0f}s") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        terminate(proc)
        log.close()
        Path(log.name).unlink(missing_ok=True)


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
