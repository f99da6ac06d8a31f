"""The start-up check of a configured cluster's bootstrap servers."""

from __future__ import annotations

import socket

import pytest

from pipeline.broker import _any_reachable, free_port


def test_a_bootstrap_list_with_one_server_down_is_still_reachable() -> None:
    """`PIPELINE_BROKER=kafka-0:9092,kafka-1:9092` while kafka-0 restarts: the start-up
    check must try the others, not fail after 30 s on the first."""
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        port = live.getsockname()[1]
        dead = free_port()
        _any_reachable(f"127.0.0.1:{dead}, 127.0.0.1:{port}")
        with pytest.raises(OSError):
            _any_reachable(f"127.0.0.1:{dead}")
        with pytest.raises(OSError):
            _any_reachable("")
