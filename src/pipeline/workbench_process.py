"""Starting the Streamlit workbench beside a running pipeline, as a child process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import ConfigurationError
from pipeline.settings import Settings

WORKBENCH_APP = Path(__file__).resolve().parents[2] / "workbench" / "app.py"


def start_workbench(settings: Settings) -> tuple[Callable[[], None], str]:
    """Run ``streamlit run workbench/app.py`` for this deployment; returns (stop, url).

    The workbench reads the same PIPELINE_HOME (read-only), so it sees what the processor writes.
    """
    if not WORKBENCH_APP.exists():
        raise ConfigurationError(f"workbench app not found at {WORKBENCH_APP} (a source checkout)")
    env = {**os.environ, "PIPELINE_HOME": str(settings.home.resolve())}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            str(WORKBENCH_APP),
            "--server.headless",
            "true",
            "--server.address",
            settings.workbench_host,
            "--server.port",
            str(settings.workbench_port),
            "--browser.gatherUsageStats",
            "false",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    return stop, f"http://{settings.workbench_host}:{settings.workbench_port}"
