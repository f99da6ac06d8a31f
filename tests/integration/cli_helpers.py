"""Running the `pipeline` command as a user would, from tests: a clean environment per home."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.broker import free_port


def cli_env(home: Path, collector_port: int | None = None) -> dict[str, str]:
    """This process's environment without PIPELINE_* settings, pointed at ``home``; every
    server on a free or ephemeral port so tests never collide."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env["PIPELINE_HOME"] = str(home)
    env["PIPELINE_COMMIT_INTERVAL_S"] = "0.3"
    env["PIPELINE_API__PORT"] = "0"
    env["PIPELINE_METRICS_PORT"] = "0"
    env["PIPELINE_COLLECTOR__PORT"] = str(collector_port or free_port())
    return env


def pipeline_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


def run_cli(
    home: Path, cwd: Path, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``pipeline ARGS`` to completion and capture its output (text)."""
    return subprocess.run(
        pipeline_cmd(*args),
        env=cli_env(home),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stop_up(
    up: subprocess.Popen[str],
    home: Path,
    sig: int = signal.SIGINT,
    timeout: float = 60,
    *,
    known_hang: str | None = None,
) -> str:
    """Stop a running `pipeline up` with ``sig`` and return its stderr.

    If it ignores the signal for ``timeout`` seconds, it and its embedded broker are killed (a
    test never leaves them behind) and the test fails with every thread's stack and the end of
    its log, or, for a ``known_hang`` (a recorded open defect), is marked xfail with that text.
    """
    up.send_signal(sig)
    try:
        return up.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        up.send_signal(signal.SIGUSR1)  # every thread's stack to stderr (faulthandler)
        time.sleep(2)
        up.kill()
        err = up.communicate()[1]
        marker = home / "broker.json"
        if marker.exists():
            with contextlib.suppress(ProcessLookupError, ValueError, KeyError):
                os.kill(int(json.loads(marker.read_text())["embedded_pid"]), signal.SIGKILL)
        message = f"`pipeline up` ignored signal {sig} for {timeout:.0f} s:\n{err[-12000:]}"
        if known_hang is not None:
            pytest.xfail(f"{known_hang}\n{message}")
        raise AssertionError(message) from None
