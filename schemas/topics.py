"""The topic catalogue as data: the stream app creates topics from it and the AsyncAPI document lists it."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from schemas.envelope import RawEvent
from schemas.outputs import DlqRecord, IdentityChange, ProfileSnapshot, ResolvedEvent

__all__ = [
    "DEFAULT_PARTITIONS",
    "DLQ",
    "EVENTS_RESOLVED",
    "IDENTITY_CHANGES",
    "PROFILES",
    "RAW_TOPIC_BY_SOURCE",
    "SCHEMAS",
    "TOPICS",
    "TOPICS_BY_NAME",
    "TopicSpec",
]

DEFAULT_PARTITIONS = 8

# Schema name (file `schemas/json/<name>.json`) → the model or annotated union it is generated from.
SCHEMAS: MappingProxyType[str, Any] = MappingProxyType(
    {
        "raw_event": RawEvent,
        "resolved_event": ResolvedEvent,
        "profile_snapshot": ProfileSnapshot,
        "identity_change": IdentityChange,
        "dlq_record": DlqRecord,
    }
)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One Kafka topic: enough to create it and to document it."""

    name: str
    key: str
    value_schema: str
    cleanup_policy: Literal["delete", "compact"]
    description: str
    partitions: int = DEFAULT_PARTITIONS


_RAW_KEY = "Strongest identifier as sent: customer_id > loyalty_card > phone > email > device_id > cookie_id"

_RAW_SOURCES = {
    "raw.web": ("web",),
    "raw.app": ("app",),
    "raw.pos": ("pos",),
    "raw.call_center": ("call_center",),
    "raw.esp": ("esp",),
    "raw.sms": ("sms", "viber"),
    "raw.push": ("push", "webpush"),
    "raw.messenger": ("messenger",),
    "raw.crm": ("crm",),
}

# Envelope `source` → the raw topic its producer writes to.
RAW_TOPIC_BY_SOURCE: MappingProxyType[str, str] = MappingProxyType(
    {source: topic for topic, sources in _RAW_SOURCES.items() for source in sources}
)

EVENTS_RESOLVED = TopicSpec(
    "events.resolved", "profile_id", "resolved_event", "delete", "Every valid event with its profile_id."
)
PROFILES = TopicSpec(
    "profiles",
    "profile_id",
    "profile_snapshot",
    "compact",
    "Latest profile snapshot; tombstone (null value) when merged away or erased.",
)
IDENTITY_CHANGES = TopicSpec(
    "identity.changes", "profile_id", "identity_change", "delete", "Identity graph changes, seq per profile."
)
DLQ = TopicSpec("dlq", "Original message key", "dlq_record", "delete", "Messages refused, with a named code.")

TOPICS: tuple[TopicSpec, ...] = (
    *(
        TopicSpec(name, _RAW_KEY, "raw_event", "delete", f"Raw envelope-v1 events from {', '.join(sources)}.")
        for name, sources in _RAW_SOURCES.items()
    ),
    EVENTS_RESOLVED,
    PROFILES,
    IDENTITY_CHANGES,
    DLQ,
)
TOPICS_BY_NAME: MappingProxyType[str, TopicSpec] = MappingProxyType({t.name: t for t in TOPICS})
