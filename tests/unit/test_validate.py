"""validate_event: every way an event can be wrong has a named code, and nothing else ever escapes."""

from __future__ import annotations

import copy
import json
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import EVENT_TYPES
from streams.events import Identifier, NormalizedEvent
from streams.exceptions import ErrorCode, InvalidEvent
from streams.normalize import NormalizationSettings
from streams.validate import Validator, validate_event

ISSUE_EXAMPLE: dict[str, Any] = {
    "schema_version": 1,
    "event_id": "pos-msk-17-000981",
    "source": "pos",
    "channel": "store",
    "type": "store_purchase",
    "occurred_at": "2026-11-24T10:00:00+03:00",
    "identifiers": [
        {"type": "phone", "value": "+7 (916) 123-45-67"},
        {"type": "loyalty_card", "value": "2000 1234 5678", "verified": True},
    ],
    "attributes": {
        "store_id": "msk-17",
        "order_id": "R-981",
        "total": "1290.00",
        "currency": "RUB",
        "items": [{"product_id": "pepperoni-30", "qty": 1, "price": "1290.00"}],
    },
    "consent": {"sms": False, "email": True},
}

# Minimal valid attributes for every event type of the contract.
ATTRIBUTES: dict[str, dict[str, Any]] = {
    "page_view": {"url": "https://shop.ru/menu"},
    "product_view": {"product_id": "pepperoni-30", "price": "590"},
    "cart_updated": {"items": [{"product_id": "pepperoni-30", "qty": 2}], "total": 1180, "currency": "RUB"},
    "order_placed": {"order_id": "W-1", "total": "1180.50", "currency": "RUB"},
    "store_purchase": ISSUE_EXAMPLE["attributes"],
    "signup": {"method": "phone_otp"},
    "login": {},
    "logout": {},
    "call": {"direction": "inbound", "duration_s": 95},
    "message_received": {"channel": "viber", "sender": "client"},
    "message_sent": {"channel": "sms", "campaign": "black-friday", "sender": "PIZZA"},
    "email_opened": {"campaign": "black-friday"},
    "email_clicked": {"campaign": "black-friday", "url": "https://shop.ru/promo"},
    "push_opened": {"message_id": "p-1"},
    "consent_changed": {"changes": {"sms": False}},
    "identify": {"reason": "crm_import"},
    "erase": {"request_id": "gdpr-7"},
}


def event(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(ISSUE_EXAMPLE)
    doc.update(changes)
    return doc


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()  # stdlib: also big integers, which orjson refuses to write


def code_of(raw: bytes, settings: NormalizationSettings | None = None) -> ErrorCode:
    with pytest.raises(InvalidEvent) as info:
        validate_event(raw, settings)
    assert info.value.message
    return info.value.code


def test_issue_example_becomes_a_normalized_event() -> None:
    result = validate_event(encode(ISSUE_EXAMPLE))
    assert result.event_id == "pos-msk-17-000981"
    assert (result.source, result.channel, result.type) == ("pos", "store", "store_purchase")
    assert result.occurred_at_ms == 1_795_503_600_000  # 07:00 UTC
    assert result.identifiers == (
        Identifier("phone", "+79161234567", False),
        Identifier("loyalty_card", "200012345678", True),
    )
    assert result.keys == ("phone:+79161234567", "loyalty_card:200012345678")
    assert result.attributes["total"] == Decimal("1290.00")
    assert result.attributes["items"][0]["price"] == Decimal("1290.00")
    assert result.consent == {"sms": False, "email": True}
    assert result.dropped == ()
    # the envelope is JSON-able as is, money as exact strings, identifiers in stored form
    envelope = orjson.loads(orjson.dumps(result.envelope))
    assert envelope["attributes"]["total"] == "1290.00"
    assert envelope["identifiers"][0] == {"type": "phone", "value": "+79161234567", "verified": False}
    assert envelope["occurred_at"] == "2026-11-24T10:00:00+03:00"


@pytest.mark.parametrize("event_type", sorted(ATTRIBUTES))
def test_every_event_type_validates(event_type: str) -> None:
    result = validate_event(encode(event(type=event_type, attributes=ATTRIBUTES[event_type])))
    assert result.type == event_type
    assert result.envelope["type"] == event_type


def test_contract_has_exactly_the_issue_event_types() -> None:
    assert set(ATTRIBUTES) == EVENT_TYPES


def test_unknown_fields_are_kept_for_forward_compatibility() -> None:
    doc = event(trace_id="t-1")
    doc["attributes"]["loyalty_tier"] = "gold"
    doc["attributes"]["items"][0]["toppings"] = ["extra cheese"]
    result = validate_event(encode(doc))
    assert result.envelope["trace_id"] == "t-1"
    assert result.attributes["loyalty_tier"] == "gold"
    assert result.envelope["attributes"]["items"][0]["toppings"] == ["extra cheese"]


def test_duplicates_collapse_and_verified_wins() -> None:
    doc = event(
        identifiers=[
            {"type": "phone", "value": "8 916 123-45-67"},
            {"type": "phone", "value": "+7 916 1234567", "verified": True},
            {"type": "email", "value": "Ivan@Mail.RU"},
            {"type": "email", "value": "ivan@mail.ru "},
        ]
    )
    result = validate_event(encode(doc))
    assert result.identifiers == (
        Identifier("phone", "+79161234567", True),
        Identifier("email", "ivan@mail.ru", False),
    )


def test_unusable_identifiers_are_dropped_with_reasons() -> None:
    doc = event(
        identifiers=[
            {"type": "phone", "value": "+7 (916) 123-45-67"},
            {"type": "email", "value": "test@test.com"},
            {"type": "device_id", "value": "00000000-0000-0000-0000-000000000000"},
            {"type": "passport", "value": "4510 123456"},
            {"type": "loyalty_card", "value": 200012345678},  # a JSON number is a card number too
        ]
    )
    result = validate_event(encode(doc))
    assert result.keys == ("phone:+79161234567", "loyalty_card:200012345678")
    assert result.dropped == (
        ("email", "blocked_value"),
        ("device_id", "zero_device_id"),
        ("other", "unknown_identifier_type"),
    )
    assert "test@test.com" not in repr(result)


def test_integer_money_and_utf8_bom_are_accepted() -> None:
    doc = event()
    doc["attributes"]["total"] = 1290
    result = validate_event(b"\xef\xbb\xbf" + encode(doc))
    assert result.attributes["total"] == Decimal(1290)


def test_timestamps_in_any_offset_become_the_same_epoch_ms() -> None:
    moscow = validate_event(encode(event(occurred_at="2026-11-24T10:00:00+03:00")))
    utc = validate_event(encode(event(occurred_at="2026-11-24T07:00:00Z")))
    assert moscow.occurred_at_ms == utc.occurred_at_ms


def _too_large() -> bytes:
    doc = event()
    doc["attributes"]["padding"] = "x" * 2048
    return encode(doc)


def _without(field: str) -> bytes:
    doc = event()
    del doc[field]
    return encode(doc)


def _attributes(**changes: Any) -> bytes:
    doc = event()
    doc["attributes"].update(changes)
    return encode(doc)


SMALL = NormalizationSettings(max_event_bytes=1024)

CASES: dict[ErrorCode, list[bytes]] = {
    ErrorCode.TOO_LARGE: [_too_large()],
    ErrorCode.NOT_UTF8: [b'{"event_id": "\xff\xfe"}', b"\xc3\x28"],
    ErrorCode.NOT_JSON: [b"", b"not json", b'{"schema_version": 1,', encode(ISSUE_EXAMPLE)[:-1]],
    ErrorCode.SCHEMA_VIOLATION: [
        b"[]",
        b'"event"',
        b"null",
        _without("event_id"),
        _without("schema_version"),
        _without("type"),
        encode(event(type=7)),
        encode(event(event_id="")),
        encode(event(identifiers="+79161234567")),
        encode(event(consent={"sms": "maybe"})),
        encode(event(schema_version="1")),
        _attributes(points=10**400),  # orjson (every writer downstream) cannot represent it
    ],
    ErrorCode.UNSUPPORTED_SCHEMA_VERSION: [encode(event(schema_version=2)), encode(event(schema_version=0))],
    ErrorCode.UNKNOWN_TYPE: [encode(event(type="purchase")), encode(event(type=""))],
    ErrorCode.UNKNOWN_SOURCE: [encode(event(source="fax"))],
    ErrorCode.INVALID_ATTRIBUTES: [
        _attributes(total=1290.5),  # money is never a float
        _attributes(currency="rub"),
        _attributes(total="12,90"),
        _attributes(items=[{"product_id": "p", "qty": -1}]),
        encode(event(attributes=None)),
        encode(event(type="message_sent", attributes={"campaign": "no channel"})),
    ],
    ErrorCode.BAD_TIMESTAMP: [
        encode(event(occurred_at="2026-11-24T10:00:00")),  # no offset: ambiguous
        encode(event(occurred_at="yesterday")),
        encode(event(occurred_at="1970-01-01T00:00:00Z")),
        encode(event(occurred_at="2206-11-24T10:00:00Z")),
        encode(event(occurred_at="9999-12-31T23:59:59-23:59")),
        _without("occurred_at"),
    ],
    ErrorCode.NO_USABLE_IDENTIFIER: [
        encode(event(identifiers=[])),
        encode(event(identifiers=[{"type": "phone", "value": "123"}, {"type": "email", "value": "null"}])),
        encode(event(type="erase", attributes={}, identifiers=[{"type": "cookie_id", "value": "undefined"}])),
    ],
}


def test_every_error_code_has_cases() -> None:
    # bad_envelope is the worker's, for its internal topic (tests/unit/test_steps.py): no event gets it
    assert set(CASES) == set(ErrorCode) - {ErrorCode.BAD_ENVELOPE}


@pytest.mark.parametrize(
    ("expected", "raw"),
    [(code, raw) for code, raws in CASES.items() for raw in raws],
    ids=lambda v: str(v)[:40],
)
def test_bad_input_gets_its_named_code(expected: ErrorCode, raw: bytes) -> None:
    assert code_of(raw, SMALL) is expected


def test_size_limit_is_a_setting() -> None:
    assert validate_event(_too_large()).event_id == ISSUE_EXAMPLE["event_id"]  # default limit is 1 MiB


def test_sources_are_configurable() -> None:
    only_web = NormalizationSettings(sources=frozenset({"web"}))
    assert code_of(encode(ISSUE_EXAMPLE), only_web) is ErrorCode.UNKNOWN_SOURCE


def test_error_messages_never_echo_identifier_values() -> None:
    with pytest.raises(InvalidEvent) as info:
        validate_event(encode(event(identifiers=[{"type": "phone", "value": "+7 916 12"}])))
    assert "916" not in str(info.value)


PII = ("79161234567", "9161234567", "916) 123-45-67", "123-45-67", "ivan.petrov", "Ivan.Petrov", "mail.ru")


def test_hashing_leaves_no_clear_phone_or_email_anywhere() -> None:
    doc = event(
        identifiers=[
            {"type": "phone", "value": "+7 (916) 123-45-67"},
            {"type": "email", "value": "Ivan.Petrov@Mail.ru"},
            {"type": "email", "value": "ivan.petrov@@mail.ru"},  # invalid: dropped, must not leak either
            {"type": "loyalty_card", "value": "2000 1234 5678"},
        ],
        contact_phone="8 (916) 123-45-67",
        note="Ivan.Petrov@Mail.ru",
    )
    doc["attributes"]["comment"] = "перезвонить на 8 916 123-45-67 или написать ivan.petrov@mail.ru"
    doc["attributes"]["courier"] = {"phone": "+7 916 1234567"}
    hashed = NormalizationSettings(hmac_key=b"k" * 32)
    result = validate_event(encode(doc), hashed)
    dumped = repr(result) + orjson.dumps(result.envelope).decode()
    for fragment in PII:
        assert fragment not in dumped, fragment
    assert {i.type for i in result.identifiers} == {"phone", "email", "loyalty_card"}
    assert result.identifiers[0].value == validate_event(encode(event()), hashed).identifiers[0].value
    assert result.attributes["total"] == Decimal("1290.00")  # non-PII untouched
    assert result.envelope["attributes"]["order_id"] == "R-981"


def test_validator_instances_are_independent() -> None:
    us = Validator(NormalizationSettings(default_region="US"))
    doc = event(identifiers=[{"type": "phone", "value": "(212) 555-0100"}])
    assert us.validate(encode(doc)).keys == ("phone:+12125550100",)
    assert code_of(encode(doc)) is ErrorCode.NO_USABLE_IDENTIFIER


def _outcome(raw: bytes, settings: NormalizationSettings | None = None) -> NormalizedEvent | ErrorCode:
    try:
        return validate_event(raw, settings)
    except InvalidEvent as exc:
        assert isinstance(exc.code, ErrorCode)
        return exc.code


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300))
def test_random_bytes_never_escape_as_anything_but_invalid_event(raw: bytes) -> None:
    _outcome(raw, SMALL)


@settings(max_examples=300, deadline=None)
@given(doc=json_values)
def test_random_json_never_escapes_as_anything_but_invalid_event(doc: Any) -> None:
    _outcome(encode(doc))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    event_type=st.sampled_from(sorted(ATTRIBUTES)),
    path=st.lists(st.sampled_from([*ISSUE_EXAMPLE, "attributes", "identifiers", "0", "value"]), max_size=3),
    replacement=json_values,
    hashing=st.booleans(),
)
def test_mutated_envelopes_never_escape(
    event_type: str, path: list[str], replacement: Any, hashing: bool
) -> None:
    doc: Any = event(type=event_type, attributes=copy.deepcopy(ATTRIBUTES[event_type]))
    target = doc
    for step in path[:-1]:
        if isinstance(target, dict) and step in target:
            target = target[step]
        elif isinstance(target, list) and step.isdigit() and int(step) < len(target):
            target = target[int(step)]
    if path and isinstance(target, dict):
        target[path[-1]] = replacement
    outcome = _outcome(encode(doc), NormalizationSettings(hmac_key=b"k" * 32) if hashing else None)
    if isinstance(outcome, NormalizedEvent):
        assert outcome.identifiers
        orjson.dumps(outcome.envelope)  # always JSON-able


def test_deeply_nested_json_is_refused_not_crashing() -> None:
    assert code_of(b"[" * 50_000 + b"]" * 50_000) is ErrorCode.NOT_JSON
    deep = event()
    deep["attributes"]["nested"] = json.loads("[" * 150 + "]" * 150)
    assert validate_event(encode(deep)).type == "store_purchase"
