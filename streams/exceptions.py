"""Every error Omnistitch raises on purpose, so callers catch one family and DLQ reasons stay named codes.

Hierarchy::

    OmnistitchError                 base of everything raised on purpose
     ├── InvalidEvent               a raw Kafka message is not a usable envelope-v1 event → DLQ
     │                              (.code: ErrorCode, .message: str)
     ├── IdentifierRejected         one identifier is unusable → dropped and counted, event goes on
     │                              (.reason: RejectReason, .message: str)
     └── ConfigError                settings / environment / blocklist file is wrong → fail at start-up

`ErrorCode` and `RejectReason` are the bounded label sets for metrics and the `error_code` of DLQ records.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ConfigError",
    "ErrorCode",
    "IdentifierRejected",
    "InvalidEvent",
    "OmnistitchError",
    "RejectReason",
]


class ErrorCode(StrEnum):
    """Why a record went to the DLQ: one code per way an event can be wrong, and one for internal records."""

    TOO_LARGE = "too_large"
    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    SCHEMA_VIOLATION = "schema_violation"
    UNSUPPORTED_SCHEMA_VERSION = "unsupported_schema_version"
    UNKNOWN_TYPE = "unknown_type"
    UNKNOWN_SOURCE = "unknown_source"
    INVALID_ATTRIBUTES = "invalid_attributes"
    BAD_TIMESTAMP = "bad_timestamp"
    NO_USABLE_IDENTIFIER = "no_usable_identifier"
    # not a raw event: a record on the app's internal topic that no worker wrote (stage "internal")
    BAD_ENVELOPE = "bad_envelope"


class RejectReason(StrEnum):
    """Why a single identifier was dropped from an otherwise valid event (counted, never fatal alone)."""

    EMPTY = "empty"
    TOO_LONG = "too_long"
    INVALID_CHARACTERS = "invalid_characters"
    UNKNOWN_IDENTIFIER_TYPE = "unknown_identifier_type"
    BLOCKED_VALUE = "blocked_value"
    INVALID_PHONE = "invalid_phone"
    INVALID_EMAIL = "invalid_email"
    ZERO_DEVICE_ID = "zero_device_id"
    INVALID_LOYALTY_CARD = "invalid_loyalty_card"
    BAD_CHECKSUM = "bad_checksum"


class OmnistitchError(Exception):
    """Base class, so one `except OmnistitchError` separates our refusals from bugs."""


class InvalidEvent(OmnistitchError):
    """A raw message cannot become a NormalizedEvent; `code` goes to the DLQ record and the metrics label."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class IdentifierRejected(OmnistitchError):
    """One identifier value is unusable; the message never contains the raw value (it may be PII)."""

    def __init__(self, reason: RejectReason, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else str(reason))
        self.reason = reason
        self.message = message


class ConfigError(OmnistitchError):
    """Settings are unusable; raised at start-up so a bad deploy fails loudly instead of mis-stitching."""


# --- core (identity graph) errors, appended by the core ---


class RulesError(ConfigError):
    """The merge-protection rules file is unreadable or wrong; fail at start-up rather than mis-stitch."""


class UnknownProfileOrIdentifier(OmnistitchError):
    """`explain` / `split` / `erase` named a profile or identifier the graph has never seen."""


__all__ += ["RulesError", "UnknownProfileOrIdentifier"]
