"""Request limits: body size (after gzip, zip-bomb safe) and per-key token-bucket rate limits."""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import AsyncIterator, Callable

from pipeline.collector.errors import RequestRejected

Clock = Callable[[], float]


class TokenBucket:
    """Allows ``rate`` events per second on average and bursts of up to ``burst`` events."""

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got {rate} and {burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self, n: int) -> float:
        """Take ``n`` tokens and return 0.0, or take none and return the seconds until they exist.

        A request larger than the bucket passes when the bucket is full, so that it can ever
        pass, and is charged in full: the bucket goes into debt, which later requests wait out,
        so the average rate holds whatever the request sizes.
        """
        needed = float(min(n, self.burst))
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= needed:
            self._tokens -= n
            return 0.0
        return (needed - self._tokens) / self.rate

    def give_back(self, n: int) -> None:
        """Return ``n`` tokens taken for events that were then refused (never above ``burst``)."""
        self._tokens = min(float(self.burst), self._tokens + n)


class RateLimiter:
    """One token bucket per source, created on first use."""

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, source: str, events: int) -> None:
        """Charge ``events`` to ``source``, or refuse with 429 and the seconds to wait."""
        bucket = self._buckets.get(source)
        if bucket is None:
            bucket = self._buckets[source] = TokenBucket(self.rate, self.burst, self._clock)
        wait = bucket.take(events)
        if wait > 0:
            raise RequestRejected(
                429,
                "rate_limited",
                f"rate limit of {self.rate:g} events/s for this write key exceeded; "
                f"retry in {wait:.2f}s",
                retry_after_s=max(1, math.ceil(wait)),
            )

    def refund(self, source: str, events: int) -> None:
        """Give back what :meth:`check` charged for a request refused after it (a bad event,
        the broker unavailable): the client's corrected batch, or the retry a 503 asks for,
        must not find the bucket spent on events that were never accepted."""
        bucket = self._buckets.get(source)
        if bucket is not None:
            bucket.give_back(events)


def _too_large(limit: int, what: str) -> RequestRejected:
    return RequestRejected(413, "body_too_large", f"{what} is over the {limit}-byte limit")


async def read_body(
    chunks: AsyncIterator[bytes],
    *,
    content_length: str | None,
    content_encoding: str | None,
    limit: int,
) -> bytes:
    """The request body, decompressed when gzip, refused (413) once it passes ``limit`` bytes.

    The compressed stream and the decompressed bytes are both bounded, so a zip bomb costs
    at most ``limit`` bytes of memory.
    """
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise RequestRejected(
                400, "bad_content_length", "Content-Length is not a number"
            ) from None
        if declared > limit:
            raise _too_large(limit, f"the body ({declared} bytes)")
    encoding = (content_encoding or "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip"):
        raise RequestRejected(
            415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not gzip or identity"
        )
    received = bytearray()
    async for chunk in chunks:
        received += chunk
        if len(received) > limit:
            raise _too_large(limit, "the body")
    if encoding == "identity":
        return bytes(received)
    return gunzip(bytes(received), limit)


def gunzip(data: bytes, limit: int) -> bytes:
    """Decompress a gzip body, every member of it (RFC 1952 allows several, as
    ``gzip.decompress`` reads them), refusing (413) output over ``limit`` bytes and (400) bad
    data, including bytes after the last member that are not another one."""
    out = bytearray()
    rest = data
    try:
        while True:
            inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            out += inflater.decompress(rest, limit + 1 - len(out))
            if len(out) > limit or inflater.unconsumed_tail:
                raise _too_large(limit, "the decompressed body")
            out += inflater.flush()
            if len(out) > limit:
                raise _too_large(limit, "the decompressed body")
            if not inflater.eof:
                raise RequestRejected(400, "bad_gzip", "the gzip body is truncated")
            rest = inflater.unused_data
            if not rest:
                return bytes(out)
    except zlib.error as exc:
        raise RequestRejected(400, "bad_gzip", f"the gzip body is corrupt: {exc}") from None
