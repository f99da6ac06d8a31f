"""Exponential backoff with full jitter, and the ``Retry-After`` header.

The ``n``-th retry (``n`` = 0, 1, ...) waits ``uniform(0, min(cap, base * 2**n))`` ("full
jitter", which spreads retries of many clients best); a ``Retry-After`` from the server wins,
capped at ``max_retry_after_s``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


def backoff_ceiling(retry: int, base_s: float, cap_s: float) -> float:
    """``min(cap, base * 2**retry)`` without overflow for large ``retry``."""
    if retry >= 64:
        return cap_s
    return min(cap_s, base_s * math.ldexp(1.0, retry))


def full_jitter(retry: int, base_s: float, cap_s: float, rand: Callable[[], float]) -> float:
    """A wait in ``[0, backoff_ceiling(retry))``; ``rand`` returns a float in ``[0, 1)``."""
    return backoff_ceiling(retry, base_s, cap_s) * rand()


def parse_retry_after(value: str | None, now_s: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # ("²".isdigit() is true too)
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_s)


def retry_delay(
    retry: int,
    *,
    base_s: float,
    cap_s: float,
    rand: Callable[[], float],
    retry_after_s: float | None = None,
    max_retry_after_s: float = math.inf,
) -> float:
    """How long to wait before retry number ``retry``: the server's word, else full jitter."""
    if retry_after_s is not None:
        return min(retry_after_s, max_retry_after_s)
    return full_jitter(retry, base_s, cap_s, rand)


def utc_now_s() -> float:
    return datetime.now(UTC).timestamp()
