"""Running the `pipeline` command as a user would, from tests: a clean environment per home."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def wait_until_serving(up: subprocess.Popen[str], url: str, *, timeout: float = 90) -> None:
    """Wait until ``url`` answers 200, as a client of a started `pipeline up` would; fail with
    `up`'s log if it exits first or the URL never answers."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if up.poll() is not None:
            raise AssertionError(
                f"`pipeline up` exited ({up.returncode}):\n{up.communicate()[1][-6000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.URLError) as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer 200 within {timeout:.0f} s: {last}")
        time.sleep(0.3)


def stop_up(
    up: subprocess.Popen[str],
    home: Path,
    sig: int = signal.SIGINT,
    timeout: float = 60,
) -> str:
    """Stop a running `pipeline up` with ``sig`` and return its stderr.

    If it ignores the signal for ``timeout`` seconds, it and its embedded broker are killed (a
    test never leaves them behind) and the test fails with every thread's stack and the end of
    its log.
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
        raise AssertionError(message) from None


@contextlib.contextmanager
def stopped_after(up: subprocess.Popen[str], home: Path, **kwargs: Any) -> Iterator[list[str]]:
    """Stop ``up`` (as `stop_up`) when the block ends; its stderr is appended to the yielded
    list, or to the message of an assertion that failed inside the block, which otherwise
    would show only the client's side."""
    log: list[str] = []
    try:
        yield log
    except AssertionError as exc:
        err = stop_up(up, home, **kwargs)
        raise AssertionError(f"{exc}\n--- `pipeline up` log ---\n{err[-6000:]}") from None
    log.append(stop_up(up, home, **kwargs))
