"""The normalised event: the one shape validation hands to the stitching core, replay and stream app."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

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

    def to_bytes(self) -> bytes:
        """Compact JSON for internal topics: carries only normalised (and, if enabled, hashed) identifiers."""
        return orjson.dumps(
            {
                "i": self.event_id,
                "s": self.source,
                "c": self.channel,
                "t": self.type,
                "at": self.occurred_at_ms,
                "ids": [(ident.type, ident.value, ident.verified) for ident in self.identifiers],
                "a": self.attributes,
                "cs": self.consent,
                "d": self.dropped,
                "e": self.envelope,
            },
            default=str,  # Decimal money travels as its exact string
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> NormalizedEvent:
        """Inverse of `to_bytes` (money attributes come back as decimal strings, which the core accepts)."""
        d = orjson.loads(raw)
        return cls(
            event_id=d["i"],
            source=d["s"],
            channel=d["c"],
            type=d["t"],
            occurred_at_ms=d["at"],
            identifiers=tuple(Identifier(t, v, bool(verified)) for t, v, verified in d["ids"]),
            attributes=d["a"],
            consent=d["cs"],
            dropped=tuple((t, r) for t, r in d["d"]),
            envelope=d["e"],
        )
