"""`pipeline up` refuses a taken workbench port instead of announcing a dead workbench."""

from __future__ import annotations

import socket

import pytest

from pipeline.errors import ConfigurationError
from pipeline.settings import Settings
from pipeline.workbench_process import start_workbench


def test_a_taken_workbench_port_is_one_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(_env_file=None, workbench_host="127.0.0.1", workbench_port=port)
        with pytest.raises(ConfigurationError, match="PIPELINE_WORKBENCH_PORT"):
            start_workbench(settings)
