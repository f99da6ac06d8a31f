"""Stage 1's re-key decision: a raw message is stitched only under its device's exact key."""

from __future__ import annotations

import pytest

from pipeline.stream.topology import _keyed_by_device


@pytest.mark.parametrize(
    ("key", "device", "keyed"),
    [
        (b"a_5d41402a", "a_5d41402a", True),
        ("appareil-é".encode(), "appareil-é", True),
        (None, "a_5d41402a", False),  # no key: sent round under the device key
        (b"cus_000042", "a_5d41402a", False),  # keyed by user: sent round
        # undecodable bytes that a lenient decode would read as the device id: its state and
        # partition follow the bytes, so the message must go round under the real key
        (b"d\xff", "d\ufffd", False),
        (b"d\xef\xbf\xbd", "d\ufffd", True),
    ],
)
def test_keyed_by_device(key: bytes | None, device: str, keyed: bool) -> None:
    assert _keyed_by_device(key, device) is keyed
