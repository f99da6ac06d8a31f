"""The load generator's message file keeps every key and value byte for byte."""

from __future__ import annotations

from pathlib import Path

from pipeline.loadgen import WireMessage, read_messages, write_messages


def test_messages_round_trip_exactly(tmp_path: Path) -> None:
    messages = [
        WireMessage(b"device-1", b'{"type":"track"}', 1_700_000_000_000),
        WireMessage(None, b"not json at all \xff\x00", 0),  # keyless, invalid UTF-8
        WireMessage(b"", b"", -5),  # empty key and value are not "no key"
        WireMessage("ünï".encode(), b"x" * 100_000, 2**40),
    ]
    path = tmp_path / "load.bin"
    write_messages(path, messages)
    assert read_messages(path) == messages


def test_an_empty_file_is_no_messages(tmp_path: Path) -> None:
    path = tmp_path / "load.bin"
    write_messages(path, [])
    assert read_messages(path) == []
