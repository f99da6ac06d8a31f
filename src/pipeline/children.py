"""Child processes the pipeline starts (broker, servers, workbench): stopping them the same way."""

from __future__ import annotations

import subprocess
from typing import Any


def terminate(process: subprocess.Popen[Any], timeout_s: float = 10.0) -> int:
    """SIGTERM ``process`` (a clean stop), SIGKILL it if it is still running after
    ``timeout_s``, and reap it; returns its exit code. A process already gone is only reaped."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(timeout=timeout_s)
