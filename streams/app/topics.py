"""Creating the app's topics with explicit partitions and cleanup policies (the broker never auto-creates)."""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from schemas.topics import DLQ, EVENTS_RESOLVED, IDENTITY_CHANGES, PROFILES, TopicSpec
from streams.config import AppSettings
from streams.exceptions import ConfigError

__all__ = ["MAX_RECORD_BYTES", "create_topics", "internal_topic", "raw_topic", "topic_plan"]

# The record limit of every topic that carries whole events, or rows that can hold them (the internal topic,
# events.resolved, the DLQ, the tables' changelogs), and of the worker's producer. Above the broker's 2 MiB
# message.max.bytes: the base64 of any message the broker accepted still fits in a DLQ record, and a cluster
# left at Kafka's 1 MB default still takes a valid event of up to 1 MiB with its resolution.
MAX_RECORD_BYTES = 8 * 1024 * 1024


def raw_topic(source: str) -> str:
    """Raw topic name for a configured source (`pos` → `raw.pos`)."""
    return f"raw.{source}"


def internal_topic(settings: AppSettings) -> str:
    """The app's protocol topic (docs/stream-protocol.md §1): envelopes between partitions."""
    return f"{settings.app_id}-internal"


# Envelopes are consumed within seconds; a week covers any outage a restart can still recover from.
INTERNAL_RETENTION_MS = str(7 * 24 * 3600 * 1000)


def topic_plan(settings: AppSettings) -> list[tuple[str, int, dict[str, str]]]:
    """(name, partitions, config) for every topic of this deployment except faust's table changelogs."""
    raw = [
        (raw_topic(source), settings.partitions, {"cleanup.policy": "delete"}) for source in settings.sources
    ]
    outputs: list[TopicSpec] = [EVENTS_RESOLVED, PROFILES, IDENTITY_CHANGES, DLQ]
    plan = raw + [
        (spec.name, settings.partitions, {"cleanup.policy": spec.cleanup_policy}) for spec in outputs
    ]
    # a DLQ record carries the refused message base64-encoded (4/3 of its size), a resolved event the whole
    # event: room for the largest
    for name, _, config in plan:
        if name in (DLQ.name, EVENTS_RESOLVED.name):
            config["max.message.bytes"] = str(MAX_RECORD_BYTES)
    # an envelope can carry a whole profile state being merged: as large as the DLQ's records
    internal_config = {
        "cleanup.policy": "delete",
        "retention.ms": INTERNAL_RETENTION_MS,
        "max.message.bytes": str(MAX_RECORD_BYTES),
    }
    plan.append((internal_topic(settings), settings.partitions, internal_config))
    return plan


def create_topics(settings: AppSettings, timeout: float = 30.0) -> dict[str, str]:
    """Create what is missing; report `created` or `exists` per topic (idempotent, safe on every start)."""
    admin = AdminClient({"bootstrap.servers": settings.bootstrap})
    plan = topic_plan(settings)
    futures = admin.create_topics(
        [
            NewTopic(name, num_partitions=parts, replication_factor=settings.replication_factor, config=cfg)
            for name, parts, cfg in plan
        ],
        request_timeout=timeout,
    )
    outcome: dict[str, str] = {}
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
            outcome[name] = "created"
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            outcome[name] = "exists"
    # faust's assignor silently skips co-partitioned topics whose partition count differs from the app's
    # (the worker then reads nothing): refuse to start instead. Topics created just now are right by
    # construction (and may not be in the metadata yet).
    existing = admin.list_topics(timeout=timeout).topics
    wrong = {
        name: len(existing[name].partitions)
        for name, parts, _ in plan
        if outcome[name] == "exists" and len(existing[name].partitions) != parts
    }
    if wrong:
        detail = ", ".join(f"{name} has {count}" for name, count in sorted(wrong.items()))
        raise ConfigError(
            f"topics must have OMNISTITCH_PARTITIONS={settings.partitions} partitions: {detail}"
        )
    return outcome
