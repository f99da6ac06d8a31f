"""Epoch-millisecond <-> ISO-8601 conversions."""

from __future__ import annotations

import pytest

from pipeline.events import iso_to_ms, ms_to_iso


@pytest.mark.parametrize(
    "ms",
    [
        0,
        -1,
        1_795_169_472_345,
        18_564_943_243_918,  # 2558: float seconds made it ...43.917Z
        32_240_597_962_599,
        253_402_300_799_999,  # the last ms of year 9999
    ],
)
def test_ms_to_iso_is_exact_and_inverts_iso_to_ms(ms: int) -> None:
    text = ms_to_iso(ms)
    assert text.endswith("Z")
    assert iso_to_ms(text) == ms


def test_ms_to_iso_formats_milliseconds_with_z() -> None:
    assert ms_to_iso(1_795_169_472_345) == "2026-11-20T10:11:12.345Z"
    assert ms_to_iso(253_402_300_799_999) == "9999-12-31T23:59:59.999Z"


def test_ms_to_iso_past_year_9999_raises_overflow() -> None:
    with pytest.raises(OverflowError):
        ms_to_iso(253_402_300_800_000)
