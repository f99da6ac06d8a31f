"""The configs topics are created with, and how the table topics' erasures are written."""

from __future__ import annotations

from pathlib import Path

import orjson
from quixstreams.models import SerializationContext

from pipeline.broker import KEPT_FOREVER, table_topic_config, topic_config, topic_extra_config
from pipeline.metrics import StreamMetrics
from pipeline.settings import Settings
from pipeline.stream.stages import KIND_ERASED, KIND_LINK, KIND_PROFILE, KIND_UNLINKED
from pipeline.stream.topology import TombstoneSerializer, new_application

WEEK_MS = 7 * 86_400_000


def test_profiles_and_links_are_compacted_tables_whose_old_values_leave_in_time() -> None:
    settings = Settings(topic_retention_ms=WEEK_MS)
    config = table_topic_config(settings)
    assert config["cleanup.policy"] == "compact"
    assert config["retention.ms"] == "-1"  # a customer not updated for weeks is still there
    assert config["max.compaction.lag.ms"] == config["delete.retention.ms"] == str(WEEK_MS)
    topics = settings.topics
    assert topic_config(settings, topics.profiles) == config
    assert topic_config(settings, topics.identities) == config
    assert topic_config(settings, topics.suppressions) == KEPT_FOREVER
    for name in (topics.raw, topics.clean, topics.segment_changes, topics.attributed):
        assert topic_config(settings, name) == topic_extra_config(settings)
        assert topic_config(settings, name)["retention.ms"] == str(WEEK_MS)


def test_with_topics_kept_forever_the_tables_are_kept_like_the_others() -> None:
    settings = Settings(topic_retention_ms=-1)
    assert table_topic_config(settings) == topic_extra_config(settings)
    assert table_topic_config(settings)["retention.ms"] == "-1"


def test_an_erasure_is_a_tombstone_and_a_profile_its_json() -> None:
    serialize = TombstoneSerializer(KIND_ERASED)
    ctx = SerializationContext(topic="profiles.updates", field="value")
    profile = {"kind": KIND_PROFILE, "customer_id": "c1", "version": 3, "cis": 41.5}
    assert orjson.loads(serialize(profile, ctx)) == profile
    erased = {"kind": KIND_ERASED, "customer_id": "c1", "requested_at": None, "erased_ms": 1}
    assert serialize(erased, ctx) is None


def test_a_devices_erasure_is_a_tombstone_on_the_links_topic() -> None:
    serialize = TombstoneSerializer(KIND_UNLINKED)
    ctx = SerializationContext(topic="identities.links", field="value")
    link = {"kind": KIND_LINK, "anonymous_id": "d1", "customer_id": "c1", "linked_ms": 5}
    assert orjson.loads(serialize(link, ctx)) == link
    unlinked = {"kind": KIND_UNLINKED, "anonymous_id": "d1", "requested_at": None}
    assert serialize(unlinked, ctx) is None


def test_the_processor_application_takes_its_commit_and_fetch_settings(tmp_path: Path) -> None:
    """Built without a broker: the settings reach quixstreams' config, defaults included."""
    metrics = StreamMetrics()
    default = new_application(Settings(home=tmp_path / "a"), "127.0.0.1:9", metrics)
    assert default.config.commit_interval == 0.5
    assert default.config.consumer_extra_config["fetch.wait.max.ms"] == 20
    tuned = Settings(home=tmp_path / "b", commit_interval_s=2.0, consumer_fetch_wait_max_ms=5)
    app = new_application(tuned, "127.0.0.1:9", metrics)
    assert app.config.commit_interval == 2.0
    assert app.config.consumer_extra_config["fetch.wait.max.ms"] == 5
