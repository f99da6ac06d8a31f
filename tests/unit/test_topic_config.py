"""The configs topics are created with, and how profile updates are written to theirs."""

from __future__ import annotations

import orjson
from quixstreams.models import SerializationContext

from pipeline.broker import KEPT_FOREVER, profile_topic_config, topic_config, topic_extra_config
from pipeline.settings import Settings
from pipeline.stream.stages import KIND_ERASED, KIND_PROFILE
from pipeline.stream.topology import ProfileUpdateSerializer

WEEK_MS = 7 * 86_400_000


def test_profile_updates_are_a_compacted_table_whose_old_values_leave_in_time() -> None:
    settings = Settings(topic_retention_ms=WEEK_MS)
    config = profile_topic_config(settings)
    assert config["cleanup.policy"] == "compact"
    assert config["retention.ms"] == "-1"  # a customer not updated for weeks is still there
    assert config["max.compaction.lag.ms"] == config["delete.retention.ms"] == str(WEEK_MS)
    topics = settings.topics
    assert topic_config(settings, topics.profiles) == config
    assert topic_config(settings, topics.suppressions) == KEPT_FOREVER
    for name in (topics.raw, topics.clean, topics.segment_changes, topics.identities):
        assert topic_config(settings, name) == topic_extra_config(settings)
        assert topic_config(settings, name)["retention.ms"] == str(WEEK_MS)


def test_with_topics_kept_forever_profile_updates_are_kept_like_the_others() -> None:
    settings = Settings(topic_retention_ms=-1)
    assert profile_topic_config(settings) == topic_extra_config(settings)
    assert profile_topic_config(settings)["retention.ms"] == "-1"


def test_an_erasure_is_a_tombstone_and_a_profile_its_json() -> None:
    serialize = ProfileUpdateSerializer()
    ctx = SerializationContext(topic="profiles.updates", field="value")
    profile = {"kind": KIND_PROFILE, "customer_id": "c1", "version": 3, "cis": 41.5}
    assert orjson.loads(serialize(profile, ctx)) == profile
    erased = {"kind": KIND_ERASED, "customer_id": "c1", "requested_at": None, "erased_ms": 1}
    assert serialize(erased, ctx) is None
