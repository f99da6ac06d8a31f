"""The benchmark's load generator, a child process, delivers every message byte for byte."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from topic_reader import read_topic

from pipeline.broker import EmbeddedBroker, ensure_topics
from pipeline.errors import PipelineError
from pipeline.loadgen import LoadGenerator, WireMessage
from pipeline.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker.start() as b:
        yield b


def test_offers_arrive_exactly_and_at_the_asked_pace(
    broker: EmbeddedBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [k for k in os.environ if k.startswith("PIPELINE_")]:
        monkeypatch.delenv(name)  # the child reads its settings from the environment
    settings = Settings(home=tmp_path)
    ensure_topics(settings, broker.address)
    first = [WireMessage(f"d{i}".encode(), f'{{"n":{i}}}'.encode(), i) for i in range(50)]
    second = [WireMessage(None if i % 3 else b"k", b"\x00\xff" * i, 0) for i in range(40)]
    with LoadGenerator(broker.address, tmp_path / "load", topic=settings.topics.raw) as load:
        load.offer(first, rate=None)  # as fast as possible
        seconds = load.offer(second, rate=100)  # 40 messages at 100/s: about 0.4 s
    got = read_topic(settings, broker.address, settings.topics.raw)
    sent = [(m.key, m.value) for m in first + second]
    assert sorted(got, key=repr) == sorted(sent, key=repr)
    assert 0.35 <= seconds < 10, "paced: the last message is due 0.39 s after the first"
    assert not list((tmp_path / "load").iterdir()), "message files are removed after each offer"


def test_a_dead_child_is_reported(tmp_path: Path) -> None:
    with LoadGenerator("127.0.0.1:1", tmp_path) as load:  # nothing listens there
        load._child.kill()
        with pytest.raises(PipelineError, match="load generator stopped"):
            load.offer([WireMessage(b"k", b"v", 0)], rate=10)
