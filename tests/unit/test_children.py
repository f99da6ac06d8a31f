"""Stopping child processes: politely first, firmly when that is ignored."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from pipeline.children import terminate


def _child(code: str) -> subprocess.Popen[bytes]:
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert child.stdout is not None
    assert child.stdout.readline() == b"up\n"  # its handlers are installed
    return child


def test_a_child_that_stops_on_sigterm_is_stopped_by_it() -> None:
    child = _child("import time; print('up', flush=True); time.sleep(60)")
    assert terminate(child, timeout_s=10) == -signal.SIGTERM


def test_a_child_that_ignores_sigterm_is_killed_after_the_timeout() -> None:
    child = _child(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    started = time.monotonic()
    assert terminate(child, timeout_s=0.5) == -signal.SIGKILL
    assert time.monotonic() - started < 10


def test_a_child_already_gone_is_only_reaped() -> None:
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    while child.poll() is None:
        time.sleep(0.01)
    assert terminate(child) == 3
