"""Offered load from a process of its own: raw messages paced at a rate, as remote senders would.

The benchmark's latency phases used to send from a thread of the process that runs the
processor. A paced sender wakes up hundreds of times a second and takes the GIL from the
processor each time, so the processor fell behind at loads it sustains alone. Real producers
(the collector, other services) run elsewhere and stay connected; so does this one:
:class:`LoadGenerator` runs ``python -m pipeline.loadgen --broker ADDR`` once and hands it one
file of messages and a rate per phase.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.runner import OutgoingMessage

_HEADER = struct.Struct("<iiq")  # key length (-1: no key), value length, delivered_ms
_NO_KEY = -1


@dataclass(frozen=True, slots=True)
class WireMessage:
    """A raw message as it goes to the broker: key, value, and when it was delivered."""

    key: bytes | None
    value: bytes
    delivered_ms: int


def wire_messages(messages: Iterable[OutgoingMessage]) -> list[WireMessage]:
    """Messages (simulated ones, say) as the load generator sends them."""
    return [WireMessage(m.key, m.value, m.delivered_ms) for m in messages]


def write_messages(path: Path, messages: Sequence[WireMessage]) -> None:
    """Write ``messages`` to ``path`` in a length-prefixed binary format (exact bytes kept)."""
    with path.open("wb") as out:
        for m in messages:
            key_len = _NO_KEY if m.key is None else len(m.key)
            out.write(_HEADER.pack(key_len, len(m.value), m.delivered_ms))
            if m.key is not None:
                out.write(m.key)
            out.write(m.value)


def read_messages(path: Path) -> list[WireMessage]:
    """Read what :func:`write_messages` wrote."""
    return list(_iter_messages(path.read_bytes()))


def _iter_messages(data: bytes) -> Iterator[WireMessage]:
    view = memoryview(data)
    pos = 0
    size = _HEADER.size
    while pos < len(data):
        key_len, value_len, delivered_ms = _HEADER.unpack_from(view, pos)
        pos += size
        key = None
        if key_len != _NO_KEY:
            key = bytes(view[pos : pos + key_len])
            pos += key_len
        value = bytes(view[pos : pos + value_len])
        pos += value_len
        yield WireMessage(key, value, delivered_ms)


class LoadGenerator:
    """A child process that sends paced load on request, with one producer kept warm.

    ``offer(messages, rate)`` blocks until they are all sent and acknowledged and returns the
    seconds that took. The first offer also pays the producer's set-up (connection, idempotent
    producer id), so offer a warm-up first. The child reads the same ``PIPELINE_*`` environment,
    so it reaches the broker the same way.
    """

    def __init__(self, address: str, work_dir: Path, *, topic: str | None = None) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        self._work_dir = work_dir
        self._offers = 0
        topic_args = ["--topic", topic] if topic else []
        self._child = subprocess.Popen(
            [sys.executable, "-m", "pipeline.loadgen", "--broker", address, *topic_args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def offer(self, messages: Sequence[WireMessage], rate: float | None) -> float:
        """Send ``messages`` at ``rate`` msg/s (``None``: as fast as possible); seconds taken."""
        child = self._child
        assert child.stdin is not None and child.stdout is not None
        self._offers += 1
        path = self._work_dir / f"load-{os.getpid()}-{self._offers}.bin"
        write_messages(path, messages)
        try:
            child.stdin.write(json.dumps({"file": str(path), "rate": rate}).encode() + b"\n")
            child.stdin.flush()
            line = child.stdout.readline()
        except BrokenPipeError:
            line = b""
        finally:
            path.unlink(missing_ok=True)
        if not line:
            raise PipelineError(f"load generator stopped: {self._stderr()}")
        seconds: float = json.loads(line)["produce_s"]
        return seconds

    def close(self) -> None:
        child = self._child
        if child.stdin is not None and not child.stdin.closed:
            # end of requests: the child exits (a dead child leaves an unsent request behind)
            with contextlib.suppress(BrokenPipeError):
                child.stdin.close()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stderr(self) -> str:
        self.close()
        assert self._child.stderr is not None
        return self._child.stderr.read().decode("utf-8", "replace")[-2000:]


def main(argv: Sequence[str] | None = None) -> int:
    """Serve offers read from stdin (one JSON object per line: file, rate) until it closes."""
    from pipeline.runner import make_producer, produce_messages

    parser = argparse.ArgumentParser(prog="python -m pipeline.loadgen", description=__doc__)
    parser.add_argument("--broker", required=True, help="bootstrap address")
    parser.add_argument("--topic", help="raw topic (default: the settings' events.raw)")
    args = parser.parse_args(argv)
    settings = Settings()
    if args.topic:
        topics = settings.topics.model_copy(update={"raw": args.topic})
        settings = settings.model_copy(update={"topics": topics})
    producer = make_producer(settings, args.broker)
    for line in sys.stdin:
        request = json.loads(line)
        messages = read_messages(Path(request["file"]))
        rate = request["rate"]
        seconds = produce_messages(
            settings,
            args.broker,
            messages,
            rate=None if rate is None else float(rate),
            producer=producer,
        )
        print(json.dumps({"produce_s": seconds, "messages": len(messages)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
