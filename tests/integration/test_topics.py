"""`omnistitch topics create` on the real broker: idempotent, and refuses a partition-count mismatch."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from streams.app.topics import MAX_RECORD_BYTES, create_topics
from streams.config import AppSettings
from streams.exceptions import ConfigError


def test_creates_missing_topics_with_partitions_and_policies(
    kafka_bootstrap: str, kafka_admin: AdminClient
) -> None:
    source = f"t{uuid.uuid4().hex[:8]}"
    settings = AppSettings(bootstrap=kafka_bootstrap, sources=(source,))
    first = create_topics(settings)
    assert first[f"raw.{source}"] == "created"
    assert create_topics(settings)[f"raw.{source}"] == "exists"  # safe on every start

    topics = kafka_admin.list_topics(timeout=10).topics
    assert len(topics[f"raw.{source}"].partitions) == settings.partitions
    resources = [ConfigResource("topic", name) for name in ("profiles", "dlq", "events.resolved")]
    configs = {r.name: f.result(timeout=10) for r, f in kafka_admin.describe_configs(resources).items()}
    assert configs["profiles"]["cleanup.policy"].value == "compact"
    for name in ("dlq", "events.resolved"):
        assert int(configs[name]["max.message.bytes"].value) == MAX_RECORD_BYTES


def test_refuses_topics_with_another_partition_count(kafka_bootstrap: str) -> None:
    create_topics(AppSettings(bootstrap=kafka_bootstrap, sources=()))  # outputs exist with the default count
    with pytest.raises(ConfigError, match="OMNISTITCH_PARTITIONS=3"):
        create_topics(AppSettings(bootstrap=kafka_bootstrap, partitions=3, sources=()))
