"""A value rebuilt in the background once it is older than its TTL (stale-while-revalidate)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class Refreshing(Generic[T]):
    """Holds ``build()``'s result; readers never wait for a rebuild once a first value exists.

    The first :meth:`get` builds in the caller's thread; later reads of a value older than
    ``ttl_s`` start one background rebuild and keep returning the old value until it is done.
    A failed rebuild keeps the old value (logged) and is retried after the next TTL.
    """

    def __init__(
        self,
        name: str,
        build: Callable[[], T],
        ttl_s: float,
        *,
        clock_ms: Callable[[], int] = _monotonic_ms,
        background: bool = True,
    ) -> None:
        self._name = name
        self._build = build
        self._ttl_ms = int(ttl_s * 1000)
        self._clock_ms = clock_ms
        self._background = background
        self._lock = threading.Lock()
        self._value: T | None = None
        self._built_ms = 0
        self._refreshing = False
        self._thread: threading.Thread | None = None
        self.builds = 0

    @property
    def built_ms(self) -> int | None:
        """When the current value was built (clock ms), None before the first build."""
        return self._built_ms if self._value is not None else None

    @property
    def ready(self) -> bool:
        """Whether a value exists: :meth:`get` then returns at once."""
        return self._value is not None

    def get(self) -> T:
        """The current value, building it first if there is none."""
        value = self._value
        if value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._build()
                    self._built_ms = self._clock_ms()
                    self.builds += 1
                return self._value
        if self._clock_ms() - self._built_ms >= self._ttl_ms:
            self._start_refresh()
        return value

    def refresh(self) -> None:
        """Rebuild now, in the caller's thread."""
        value = self._build()
        with self._lock:
            self._value = value
            self._built_ms = self._clock_ms()
            self.builds += 1

    def _start_refresh(self) -> None:
        with self._lock:
            if self._refreshing:
                return
            self._refreshing = True
            # Pushing built_ms forward means a failing build is retried once per TTL, not per read.
            self._built_ms = self._clock_ms()
        if not self._background:
            self._run_refresh()
            return
        self._thread = threading.Thread(
            target=self._run_refresh, name=f"refresh-{self._name}", daemon=True
        )
        self._thread.start()

    def _run_refresh(self) -> None:
        try:
            self.refresh()
        except Exception:
            log.exception("rebuilding %s failed; serving the previous value", self._name)
        finally:
            with self._lock:
                self._refreshing = False

    def join(self, timeout_s: float | None = None) -> None:
        """Wait for a background rebuild in progress (tests, shutdown)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
