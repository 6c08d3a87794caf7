"""Output contracts: what downstream teams read from events.resolved, profiles, identity.changes and dlq."""

from __future__ import annotations

from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.envelope import RawEvent

__all__ = [
    "ActivityCounter",
    "DlqRecord",
    "DroppedIdentifier",
    "IdentifiersAttached",
    "IdentityChange",
    "IdentityChangeKind",
    "IdentityChangeV1",
    "MergeRefused",
    "OrderStats",
    "ProfileCreated",
    "ProfileErased",
    "ProfileSnapshot",
    "ProfileSplit",
    "ProfileStatus",
    "ProfilesMerged",
    "ResolvedEvent",
    "SeenIdentifier",
]

_OPEN = ConfigDict(frozen=True, extra="allow")
_Ms = Annotated[int, Field(ge=0, description="Milliseconds since the Unix epoch (UTC).")]
_Key = Annotated[str, Field(description="Identifier key `type:value` (value normalised, hashed if enabled).")]


class DroppedIdentifier(BaseModel):
    """An identifier removed during normalisation (the value itself is never repeated: it may be PII)."""

    model_config = _OPEN

    type: str
    reason: str = Field(description="invalid_phone, invalid_email, blocked_value, zero_device_id, …")


class ResolvedEvent(BaseModel):
    """The raw event after stitching: consumers get the person (`profile_id`) without re-resolving."""

    model_config = _OPEN

    schema_version: Literal[1] = 1
    profile_id: str | None = Field(
        description="The person; null when no identifier could link (all blocked, generic or refused)."
    )
    anchor: _Key | None = Field(
        default=None,
        description=(
            "The identifier the event was resolved through (its highest-priority usable one). If that value"
            " is later found generic (a `merge_refused` change with rule `generic_value`), the event is no"
            " longer attributed to anyone."
        ),
    )
    event_id: str
    identifier_keys: list[_Key]
    dropped: list[DroppedIdentifier] = Field(default_factory=list)
    occurred_at_ms: _Ms
    resolved_at_ms: _Ms
    event: RawEvent = Field(description="The validated envelope, identifiers replaced by their stored form.")


class ProfileStatus(StrEnum):
    """Lifecycle of a profile; merged and erased profiles are tombstoned on the compacted topic."""

    ACTIVE = "active"
    MERGED = "merged"
    ERASED = "erased"


class SeenIdentifier(BaseModel):
    """One identifier of a profile with its provenance, so consumers can rank which phone to use."""

    model_config = _OPEN

    value: str
    first_seen_ms: _Ms
    last_seen_ms: _Ms
    source: str = Field(description="Source that first reported it.")
    verified: bool = False


class ActivityCounter(BaseModel):
    """How often and how recently a channel or source saw the person."""

    model_config = _OPEN

    count: int = Field(ge=0)
    last_seen_ms: _Ms


class OrderStats(BaseModel):
    """Orders (online and in store) and revenue per currency; decimal, never float."""

    model_config = _OPEN

    count: int = Field(0, ge=0)
    revenue: dict[str, Decimal] = Field(default_factory=dict, description="ISO 4217 currency → total.")


class ProfileSnapshot(BaseModel):
    """Latest state of one person, keyed by profile_id on a compacted topic; extra fields slot in later."""

    model_config = _OPEN

    schema_version: Literal[1] = 1
    profile_id: str
    status: ProfileStatus = ProfileStatus.ACTIVE
    seq: int = Field(ge=0, description="Per-profile sequence number; a consumer ignores a lower one.")
    identifiers: dict[str, list[SeenIdentifier]] = Field(
        default_factory=dict, description="Identifier type → identifiers of that type."
    )
    channels: dict[str, ActivityCounter] = Field(default_factory=dict)
    sources: dict[str, ActivityCounter] = Field(default_factory=dict)
    orders: OrderStats = Field(default_factory=OrderStats)
    consent: dict[str, bool] = Field(default_factory=dict)
    merged_from: list[str] = Field(default_factory=list, description="Profiles merged into this one.")
    first_activity_ms: _Ms
    last_activity_ms: _Ms
    updated_at_ms: _Ms
    traits: dict[str, Any] = Field(default_factory=dict, description="Room for personalisation fields.")


class IdentityChangeKind(StrEnum):
    """Kinds of change to the identity graph, one per IdentityChange model."""

    PROFILE_CREATED = "profile_created"
    IDENTIFIERS_ATTACHED = "identifiers_attached"
    PROFILES_MERGED = "profiles_merged"
    MERGE_REFUSED = "merge_refused"
    PROFILE_SPLIT = "profile_split"
    PROFILE_ERASED = "profile_erased"


class IdentityChangeV1(BaseModel):
    """Fields every identity change carries; `(profile_id, seq)` is unique and orders changes per profile."""

    model_config = _OPEN

    schema_version: Literal[1] = 1
    profile_id: str
    seq: int = Field(ge=0)
    at_ms: _Ms
    cause_event_id: str | None = Field(None, description="The event that caused it, when there is one.")


class ProfileCreated(IdentityChangeV1):
    """A new person appeared."""

    kind: Literal["profile_created"] = "profile_created"
    identifiers: list[_Key]


class IdentifiersAttached(IdentityChangeV1):
    """Known person, new identifiers."""

    kind: Literal["identifiers_attached"] = "identifiers_attached"
    identifiers: list[_Key]


class ProfilesMerged(IdentityChangeV1):
    """Two or more profiles turned out to be one person; `profile_id` is the survivor."""

    kind: Literal["profiles_merged"] = "profiles_merged"
    survivor: str
    merged: list[str] = Field(min_length=1, description="Profiles absorbed (tombstoned on `profiles`).")
    identifiers_moved: list[_Key] = Field(
        default_factory=list,
        description="Identifiers the absorbed profiles brought to the survivor (empty in older records).",
    )


class MergeRefused(IdentityChangeV1):
    """A link was not made because a rule forbade it (e.g. shared family phone, too many ids)."""

    kind: Literal["merge_refused"] = "merge_refused"
    reason: str
    rule: str
    candidates: list[str] = Field(default_factory=list, description="Profiles that would have merged.")
    identifiers: list[_Key] = Field(
        default_factory=list,
        description=(
            "The event's identifiers the refusal is about: for a refused merge, those the other profile"
            " keeps; for a refused attach, the identifier left out; for rule `generic_value` or"
            " `shared_device`, the value that stopped linking (events anchored by it are no longer"
            " attributed). Empty in records written before this field existed."
        ),
    )


class ProfileSplit(IdentityChangeV1):
    """One profile was separated into several (a wrong link undone)."""

    kind: Literal["profile_split"] = "profile_split"
    new_profiles: list[str] = Field(min_length=1)
    reason: str
    identifiers: list[_Key] = Field(
        default_factory=list,
        description="Identifiers moved to the new profile with their future events (empty in older records).",
    )


class ProfileErased(IdentityChangeV1):
    """Right to be forgotten executed; the profile is tombstoned everywhere."""

    kind: Literal["profile_erased"] = "profile_erased"
    reason: str | None = None


IdentityChange = Annotated[
    ProfileCreated | IdentifiersAttached | ProfilesMerged | MergeRefused | ProfileSplit | ProfileErased,
    Field(discriminator="kind"),
]


class DlqRecord(BaseModel):
    """A message we could not process, with enough context to replay it after a fix."""

    model_config = _OPEN

    schema_version: Literal[1] = 1
    original_key_b64: str | None = Field(None, description="Original Kafka key, base64 (standard alphabet).")
    original_value_b64: str = Field(description="Original message bytes, base64 (standard alphabet).")
    source_topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)
    error_code: str = Field(
        description="A named code, e.g. not_json, schema_violation, no_usable_identifier."
    )
    message: str = Field(description="Human-readable detail; never contains the raw identifier values.")
    stage: str = Field(description="Pipeline stage that refused it, e.g. validate, resolve.")
    failed_at_ms: _Ms
