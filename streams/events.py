"""The normalised event: the one shape validation hands to the stitching core, replay and stream app."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Identifier", "NormalizedEvent"]


@dataclass(frozen=True, slots=True)
class Identifier:
    """A usable identifier after normalisation (and optional HMAC hashing): safe to store and link."""

    type: str
    value: str
    verified: bool = False

    @property
    def key(self) -> str:
        """`type:value`, the graph's node name and the Kafka key of identifier-keyed topics."""
        return f"{self.type}:{self.value}"


@dataclass(frozen=True, slots=True)
class NormalizedEvent:
    """A valid envelope-v1 event with its identifiers normalised, deduplicated and filtered.

    `identifiers` holds only usable ones (invalid and blocked values removed, same key given once,
    verified if any copy was verified); `dropped` says which were removed and why, so they can be counted.
    `envelope` is the producer's JSON as received (already validated), with `identifiers` replaced by the
    usable ones in stored form and, when hashing is on, clear phones/e-mails elsewhere replaced by hashes.
    """

    event_id: str
    source: str
    channel: str
    type: str
    occurred_at_ms: int
    identifiers: tuple[Identifier, ...]
    attributes: dict[str, Any] = field(default_factory=dict)
    consent: dict[str, bool] = field(default_factory=dict)
    dropped: tuple[tuple[str, str], ...] = ()
    envelope: dict[str, Any] = field(default_factory=dict)

    @property
    def keys(self) -> tuple[str, ...]:
        """Identifier keys (`type:value`) in event order: what the graph links and resolved events list."""
        return tuple(identifier.key for identifier in self.identifiers)
