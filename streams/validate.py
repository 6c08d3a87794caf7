"""Raw bytes → NormalizedEvent or a named InvalidEvent: the only door from `raw.*` topics into stitching."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import phonenumbers
from pydantic import TypeAdapter, ValidationError

from schemas.envelope import EVENT_TYPES, RawEvent, RawEventV1
from streams.events import Identifier, NormalizedEvent
from streams.exceptions import ErrorCode, IdentifierRejected, InvalidEvent
from streams.normalize import NormalizationSettings, Normalizer, PerSettings, hash_identifier

__all__ = ["MAX_OCCURRED_AT", "MIN_OCCURRED_AT", "Validator", "validate_event"]

# Outside this window a timestamp is a device clock reset (1970) or a typo (2206), not an event time.
MIN_OCCURRED_AT = datetime(2000, 1, 1, tzinfo=UTC)
MAX_OCCURRED_AT = datetime(2100, 1, 1, tzinfo=UTC)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_MIN_MS = (MIN_OCCURRED_AT - _EPOCH) // _MS
_MAX_MS = (MAX_OCCURRED_AT - _EPOCH) // _MS
_BOM = b"\xef\xbb\xbf"
# Built once: pydantic-core validates JSON bytes straight into the models, in Rust, in one pass.
_RAW_EVENT: TypeAdapter[RawEvent] = TypeAdapter(RawEvent)
# Dropped identifiers of unconfigured types are counted under one label so metrics stay bounded.
_OTHER_TYPE = "other"
# Attribute keys whose values are phone numbers even when no identifier says so (scrubbed when hashing).
_PHONE_KEY_HINTS = ("phone", "msisdn", "tel")
_ENVELOPE_FIXED = frozenset({"schema_version", "source", "type", "occurred_at", "identifiers", "consent"})


class Validator:
    """Settings, the compiled normaliser and its cache, reused for every message of a worker."""

    __slots__ = ("_normalizer", "keep_unlinkable", "settings")

    def __init__(
        self, settings: NormalizationSettings | None = None, *, keep_unlinkable: bool = False
    ) -> None:
        """`keep_unlinkable`: an event whose every identifier was dropped (blocked, invalid) is returned with
        none, not refused as `no_usable_identifier`: the replay writes it a null assignment (issue 4), where
        the stream dead-letters it."""
        self.settings = settings or NormalizationSettings()
        self._normalizer = Normalizer(self.settings)
        self.keep_unlinkable = keep_unlinkable

    def validate(self, raw: bytes) -> NormalizedEvent:
        """Parse, validate, normalise; raise InvalidEvent with the first reason the event is unusable."""
        settings = self.settings
        if len(raw) > settings.max_event_bytes:
            raise InvalidEvent(ErrorCode.TOO_LARGE, f"{len(raw)} bytes > limit {settings.max_event_bytes}")
        if raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        # bytes → RawEvent model (one of the 17 envelope classes)
        try:
            event = _RAW_EVENT.validate_json(raw)
        except ValidationError as exc:
            raise _classify(raw, exc) from None
        if event.source not in settings.sources:
            raise InvalidEvent(ErrorCode.UNKNOWN_SOURCE, f"source {event.source[:64]!r} is not configured")
        occurred_at_ms = _epoch_ms(event.occurred_at)
        # RawEvent → (usable identifiers, dropped (type, reason))
        identifiers, dropped = self._identifiers(event)
        if not identifiers and not self.keep_unlinkable:
            reasons = ", ".join(f"{t}:{r}" for t, r in dropped)
            raise InvalidEvent(ErrorCode.NO_USABLE_IDENTIFIER, f"every identifier was dropped ({reasons})")
        # The producer's own JSON (now known to match the contract), re-read by orjson: faster than dumping
        # the models, faithful to what was sent, and proof that every orjson writer downstream can carry it.
        try:
            envelope: dict[str, Any] = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidEvent(ErrorCode.SCHEMA_VIOLATION, f"not representable in orjson: {exc}") from None
        envelope["identifiers"] = [
            {"type": i.type, "value": i.value, "verified": i.verified} for i in identifiers
        ]
        attributes: dict[str, Any] = event.attributes.model_dump()
        if settings.hashing:
            secrets = self._secrets(event, identifiers)
            envelope = {
                k: v if k in _ENVELOPE_FIXED else self._scrub(v, k, secrets) for k, v in envelope.items()
            }
            attributes = {k: self._scrub(v, k, secrets) for k, v in attributes.items()}
        return NormalizedEvent(
            event_id=envelope["event_id"],
            source=event.source,
            channel=envelope["channel"],
            type=event.type,
            occurred_at_ms=occurred_at_ms,
            identifiers=identifiers,
            attributes=attributes,
            consent=dict(event.consent),
            dropped=dropped,
            envelope=envelope,
        )

    def _identifiers(self, event: RawEventV1) -> tuple[tuple[Identifier, ...], tuple[tuple[str, str], ...]]:
        """Normalise each identifier; same key given twice collapses into one, verified if either copy was."""
        normalize = self._normalizer.normalize
        types = self.settings.identifier_types
        usable: dict[tuple[str, str], Identifier] = {}
        dropped: list[tuple[str, str]] = []
        for given in event.identifiers:
            try:
                value = normalize(given.type, given.value)
            except IdentifierRejected as exc:
                dropped.append((given.type if given.type in types else _OTHER_TYPE, exc.reason.value))
                continue
            key = (given.type, value)
            seen = usable.get(key)
            if seen is None or (given.verified and not seen.verified):
                usable[key] = Identifier(given.type, value, given.verified)
        return tuple(usable.values()), tuple(dropped)

    def _secrets(self, event: RawEventV1, identifiers: Iterable[Identifier]) -> dict[str, str]:
        """Clear forms of this event's hashed identifiers (as sent, canonical) → their hash, for scrubbing."""
        secrets: dict[str, str] = {}
        hashed = self.settings.hashed_types
        for given in event.identifiers:
            if given.type not in hashed:
                continue
            try:
                stored = self._normalizer.normalize(given.type, given.value)
                canonical = self._normalizer.canonical(given.type, given.value)
            except IdentifierRejected:
                secrets[given.value.strip()] = "[redacted]"
                continue
            secrets[given.value.strip()] = stored
            secrets[canonical] = stored
        for ident in identifiers:
            secrets.pop(ident.value, None)  # hashes map to themselves; nothing to replace
        return secrets

    def _scrub(self, value: Any, key: str, secrets: Mapping[str, str]) -> Any:
        """Replace clear phones/e-mails hidden in attributes or unknown fields: hashing must mean no PII."""
        if isinstance(value, str):
            return self._scrub_text(value, key, secrets)
        if isinstance(value, dict):
            return {k: self._scrub(v, str(k), secrets) for k, v in value.items()}
        if isinstance(value, list):
            return [self._scrub(v, key, secrets) for v in value]
        return value

    def _scrub_text(self, text: str, key: str, secrets: Mapping[str, str]) -> str:
        """One string: exact identifier values, e-mail tokens, phones in text or under phone-like keys."""
        settings = self.settings
        if (hit := secrets.get(text.strip())) is not None:
            return hit
        if "email" in settings.hashed_types and "@" in text:
            text = " ".join(self._hash_or_keep("email", token) for token in text.split(" "))
        if "phone" in settings.hashed_types and sum(ch.isdigit() for ch in text) >= 7:
            if any(hint in key.lower() for hint in _PHONE_KEY_HINTS):
                return self._hash_or_keep("phone", text, "[redacted]")
            matcher = phonenumbers.PhoneNumberMatcher(text, settings.default_region)
            for match in reversed(list(matcher)):
                replacement = self._hash_or_keep("phone", match.raw_string)
                text = text[: match.start] + replacement + text[match.end :]
        return text

    def _hash_or_keep(self, type_: str, token: str, fallback: str | None = None) -> str:
        """The hashed form if `token` is a valid `type_` identifier, else `fallback` (default: unchanged)."""
        try:
            canonical = self._normalizer.canonical(type_, token.strip("<>()[],;:\"'"))
        except IdentifierRejected:
            return token if fallback is None else fallback
        key = self.settings.hmac_key
        assert key is not None  # only called when hashing is on
        return hash_identifier(type_, canonical, key)


def _epoch_ms(occurred_at: datetime) -> int:
    """Milliseconds since the epoch, refusing implausible times (integer maths: no float rounding)."""
    try:
        ms = (occurred_at - _EPOCH) // _MS
    except OverflowError:
        ms = -1
    if not _MIN_MS <= ms < _MAX_MS:
        raise InvalidEvent(
            ErrorCode.BAD_TIMESTAMP, f"occurred_at outside [{MIN_OCCURRED_AT}, {MAX_OCCURRED_AT})"
        )
    return ms


def _classify(raw: bytes, exc: ValidationError) -> InvalidEvent:
    """Turn pydantic's errors into one named code; the slow path, run only for bad events."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    if any(err["type"] == "json_invalid" for err in errors):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as decode_error:
            return InvalidEvent(ErrorCode.NOT_UTF8, f"invalid UTF-8 at byte {decode_error.start}")
        return InvalidEvent(ErrorCode.NOT_JSON, errors[0]["msg"])
    try:
        document = json.loads(raw)  # stdlib, not orjson: it reads integers beyond 64 bits like pydantic does
    except ValueError as json_error:
        return InvalidEvent(ErrorCode.NOT_JSON, str(json_error))
    if not isinstance(document, dict):
        return InvalidEvent(
            ErrorCode.SCHEMA_VIOLATION, f"top level is a JSON {type(document).__name__}, not object"
        )
    version = document.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version != 1:
        return InvalidEvent(ErrorCode.UNSUPPORTED_SCHEMA_VERSION, f"schema_version {version} (supported: 1)")
    event_type = document.get("type")
    if not isinstance(event_type, str):
        return InvalidEvent(ErrorCode.SCHEMA_VIOLATION, "type: a string field is required")
    if event_type not in EVENT_TYPES:
        return InvalidEvent(ErrorCode.UNKNOWN_TYPE, f"type {event_type[:64]!r} is not an envelope-v1 type")
    first = errors[0]
    loc = tuple(str(part) for part in first["loc"])
    if loc and loc[0] == event_type:
        loc = loc[1:]  # the discriminated union prefixes the tag
    message = f"{'.'.join(loc) or '<root>'}: {first['msg']}"
    if not loc:
        code = ErrorCode.SCHEMA_VIOLATION
    elif loc[0] == "occurred_at":
        code = ErrorCode.BAD_TIMESTAMP
    elif loc == ("identifiers",) and first["type"] == "too_short":
        code = ErrorCode.NO_USABLE_IDENTIFIER
    elif loc[0] == "attributes":
        code = ErrorCode.INVALID_ATTRIBUTES
    else:
        code = ErrorCode.SCHEMA_VIOLATION
    return InvalidEvent(code, message)


_VALIDATORS: PerSettings[Validator] = PerSettings(Validator)


def validate_event(raw: bytes, settings: NormalizationSettings | None = None) -> NormalizedEvent:
    """Convenience for one-off calls; reuses a Validator (and its cache) per settings object."""
    return _VALIDATORS.get(settings).validate(raw)
