"""Core results → the output contracts' JSON (schemas/outputs.py), shared by the stream app and the replay.

Records are built as plain dicts and serialised with orjson (pydantic models cost ~10 µs an event on the hot
path); tests validate every shape against the contract models so the two cannot drift.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from streams.core.graph import ChangeKind, IdentityChange
from streams.core.state import ACTIVE, ProfileState
from streams.events import NormalizedEvent

__all__ = ["change_record", "dlq_record", "dumps", "profile_record", "resolved_record"]


def dumps(record: dict[str, Any]) -> bytes:
    """orjson with Decimal as a string (money is never a float on the wire)."""
    return orjson.dumps(record, default=str)


def resolved_record(
    event: NormalizedEvent, profile_id: str | None, resolved_at_ms: int, anchor: str | None = None
) -> dict[str, Any]:
    """`events.resolved` value: the validated envelope plus the person it belongs to, and through what."""
    return {
        "schema_version": 1,
        "profile_id": profile_id,
        "anchor": anchor,
        "event_id": event.event_id,
        "identifier_keys": list(event.keys),
        "dropped": [{"type": type_, "reason": reason} for type_, reason in event.dropped],
        "occurred_at_ms": event.occurred_at_ms,
        "resolved_at_ms": resolved_at_ms,
        "event": event.envelope,
    }


def profile_record(profile: ProfileState, updated_at_ms: int) -> dict[str, Any] | None:
    """`profiles` value, or None (a tombstone) once the profile is merged away or erased."""
    if profile.status != ACTIVE:
        return None
    snapshot = profile.snapshot()
    by_type: dict[str, list[dict[str, Any]]] = {}
    for key, seen in snapshot["identifiers"].items():
        by_type.setdefault(seen["type"], []).append(
            {
                "value": key.partition(":")[2],
                "first_seen_ms": seen["first_seen_ms"],
                "last_seen_ms": seen["last_seen_ms"],
                "source": seen["source"],
                "verified": seen["verified"],
            }
        )
    return {
        "schema_version": 1,
        "profile_id": profile.id,
        "status": "active",
        "seq": profile.seq,
        "identifiers": by_type,
        "channels": snapshot["channels"],
        "sources": snapshot["sources"],
        "orders": {"count": snapshot["orders"], "revenue": snapshot["revenue"]},
        "merged_from": snapshot["merged_from"],
        "first_activity_ms": snapshot["first_activity_ms"],
        "last_activity_ms": snapshot["last_activity_ms"],
        "updated_at_ms": updated_at_ms,
    }


def change_record(change: IdentityChange) -> dict[str, Any]:
    """`identity.changes` value: the core's change in the contract's shape for its kind."""
    payload = change.payload
    record: dict[str, Any] = {
        "schema_version": 1,
        "kind": change.kind.value,
        "profile_id": change.profile_id,
        "seq": change.seq,
        "at_ms": change.at_ms,
        "cause_event_id": change.event_id,
    }
    if change.kind is ChangeKind.CREATED:
        record["identifiers"] = list(payload["identifiers"])
    elif change.kind is ChangeKind.ATTACHED:
        record["identifiers"] = [payload["identifier"]]
    elif change.kind is ChangeKind.MERGED:
        record["survivor"] = change.profile_id
        record["merged"] = [payload["merged_profile_id"]]
        record["identifiers_moved"] = list(payload["identifiers_moved"])
    elif change.kind is ChangeKind.REFUSED:
        record["rule"] = payload["rule"]
        record["reason"] = payload["detail"]
        record["candidates"] = [payload["other_profile_id"]] if payload.get("other_profile_id") else []
        record["identifiers"] = list(payload["identifiers"])
    elif change.kind is ChangeKind.SPLIT:
        record["new_profiles"] = [payload["split_profile_id"]]
        record["reason"] = payload["reason"]
        record["identifiers"] = list(payload["identifiers"])
    elif change.kind is ChangeKind.ERASED:
        record["reason"] = payload.get("reason")
    return record


def dlq_record(
    *,
    key: bytes | None,
    value: bytes,
    topic: str,
    partition: int,
    offset: int,
    code: str,
    message: str,
    stage: str,
    failed_at_ms: int,
) -> dict[str, Any]:
    """`dlq` value: the original bytes (base64) and where they came from, so a fix can replay them."""
    return {
        "schema_version": 1,
        "original_key_b64": base64.b64encode(key).decode() if key is not None else None,
        "original_value_b64": base64.b64encode(value).decode(),
        "source_topic": topic,
        "partition": partition,
        "offset": offset,
        "error_code": code,
        "message": message,
        "stage": stage,
        "failed_at_ms": failed_at_ms,
    }
