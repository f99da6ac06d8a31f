"""Running the `pipeline` command as a user would, from tests: a clean environment per home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
