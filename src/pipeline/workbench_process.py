"""Starting the Streamlit workbench beside a running pipeline, as a child process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.children import terminate
from pipeline.errors import ConfigurationError
from pipeline.settings import Settings

WORKBENCH_APP = Path(__file__).resolve().parents[2] / "workbench" / "app.py"


def streamlit_options(settings: Settings) -> list[str]:
    """The options of ``streamlit run`` for the workbench (deploy/kubernetes sets the same)."""
    return [
        "--server.headless",
        "true",
        "--server.address",
        settings.workbench_host,
        "--server.port",
        str(settings.workbench_port),
        "--browser.gatherUsageStats",
        "false",
        # the tables' own CSV download does not neutralize formulas (a visitor's name
        # "=HYPERLINK(...)" runs in the marketer's spreadsheet); the Segments page's Export
        # CSV does (workbench_data.members_csv)
        "--client.disableDataExport",
        "true",
    ]


def start_workbench(settings: Settings) -> tuple[Callable[[], None], str]:
    """Run ``streamlit run workbench/app.py`` for this deployment; returns (stop, url).

    The workbench reads the same PIPELINE_HOME (read-only), so it sees what the processor writes.
    """
    if not WORKBENCH_APP.exists():
        raise ConfigurationError(f"workbench app not found at {WORKBENCH_APP} (a source checkout)")
    _check_free(settings.workbench_host, settings.workbench_port)
    env = {**os.environ, "PIPELINE_HOME": str(settings.home.resolve())}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            str(WORKBENCH_APP),
            *streamlit_options(settings),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def stop() -> None:
        terminate(proc)

    return stop, f"http://{settings.workbench_host}:{settings.workbench_port}"


def _check_free(host: str, port: int) -> None:
    """ConfigurationError when ``host:port`` is taken: Streamlit, detached from our output,
    would die unseen while `up` announced its URL (answered by whatever holds the port)."""
    if port == 0:
        return
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve the workbench on {host}:{port} ({exc.strerror}): set "
                "PIPELINE_WORKBENCH_PORT to a free port, or run `pipeline up --no-workbench`"
            ) from exc
