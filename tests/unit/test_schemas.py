"""Contracts: importable from `schemas`, frozen, forward compatible, and their committed files never drift."""

from __future__ import annotations

import base64
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import TypeAdapter, ValidationError

import schemas
from schemas import (
    DEFAULT_PARTITIONS,
    RAW_TOPIC_BY_SOURCE,
    SCHEMAS,
    SOURCE_FAMILIES,
    TOPICS,
    TOPICS_BY_NAME,
    ChannelFamily,
    DlqRecord,
    IdentityChange,
    IdentityChangeKind,
    MergeRefused,
    ProfileSnapshot,
    ProfileStatus,
    RawEvent,
    ResolvedEvent,
    generate,
)
from schemas.envelope import StorePurchaseEvent


def test_public_names_are_importable() -> None:
    for name in schemas.__all__:
        assert getattr(schemas, name) is not None


def test_committed_files_match_the_models() -> None:
    assert generate.check() == [], "run `python -m schemas.generate`"


def test_check_detects_drift_and_write_repairs_it(tmp_path: Path) -> None:
    assert generate.main(["--root", str(tmp_path)]) == 0
    assert generate.main(["--check", "--root", str(tmp_path)]) == 0
    schema_file = tmp_path / "json" / "profile_snapshot.json"
    schema_file.write_text(schema_file.read_text().replace('"seq"', '"sequence"'))
    (tmp_path / "asyncapi.yaml").unlink()
    assert sorted(generate.check(tmp_path)) == ["asyncapi.yaml", "json/profile_snapshot.json"]
    assert generate.main(["--check", "--root", str(tmp_path)]) == 1
    assert generate.main(["--root", str(tmp_path)]) == 0
    assert generate.check(tmp_path) == []


def test_every_contract_has_a_json_schema_file() -> None:
    for name in SCHEMAS:
        schema = json.loads((generate.ROOT / "json" / f"{name}.json").read_text())
        assert schema["$id"] == f"{name}.json"


def test_asyncapi_lists_every_topic_with_key_schema_partitions_and_policy() -> None:
    document = yaml.safe_load((generate.ROOT / "asyncapi.yaml").read_text())
    expected = {
        f"raw.{s}" for s in ("web", "app", "pos", "call_center", "esp", "sms", "push", "messenger", "crm")
    }
    expected |= {"events.resolved", "profiles", "identity.changes", "dlq"}
    assert set(document["channels"]) == expected == set(TOPICS_BY_NAME)
    for name, channel in document["channels"].items():
        spec = TOPICS_BY_NAME[name]
        kafka = channel["bindings"]["kafka"]
        assert kafka["partitions"] == DEFAULT_PARTITIONS == spec.partitions
        assert kafka["topicConfiguration"]["cleanup.policy"] == [spec.cleanup_policy]
        (message,) = channel["messages"].values()
        assert message["payload"]["$ref"] == f"./json/{spec.value_schema}.json"
        assert message["bindings"]["kafka"]["key"]["description"] == spec.key
    assert TOPICS_BY_NAME["profiles"].cleanup_policy == "compact"
    assert {t.key for t in TOPICS if t.name in {"events.resolved", "profiles", "identity.changes"}} == {
        "profile_id"
    }
    assert all(t.cleanup_policy == "delete" for t in TOPICS if t.name.startswith("raw."))


def test_every_source_has_a_raw_topic_and_a_family() -> None:
    assert len(SOURCE_FAMILIES) >= 8
    assert set(SOURCE_FAMILIES.values()) == set(ChannelFamily)
    assert set(RAW_TOPIC_BY_SOURCE) == set(SOURCE_FAMILIES)
    assert RAW_TOPIC_BY_SOURCE["viber"] == "raw.sms"
    assert RAW_TOPIC_BY_SOURCE["webpush"] == "raw.push"
    assert set(RAW_TOPIC_BY_SOURCE.values()) <= set(TOPICS_BY_NAME)


RAW: dict[str, Any] = {
    "schema_version": 1,
    "event_id": "e-1",
    "source": "pos",
    "channel": "store",
    "type": "store_purchase",
    "occurred_at": "2026-11-24T10:00:00+03:00",
    "identifiers": [{"type": "phone", "value": "+79161234567"}],
    "attributes": {"store_id": "msk-17", "order_id": "R-981", "total": "1290.00", "currency": "RUB"},
}


def test_raw_event_union_picks_the_model_by_type_and_is_frozen() -> None:
    parsed = TypeAdapter(RawEvent).validate_python(RAW)
    assert isinstance(parsed, StorePurchaseEvent)
    assert parsed.attributes.total == Decimal("1290.00")
    with pytest.raises(ValidationError):
        parsed.event_id = "other"  # type: ignore[misc]


def test_resolved_event_round_trips_through_json() -> None:
    resolved = ResolvedEvent(
        profile_id="p-1",
        event_id="e-1",
        identifier_keys=["phone:+79161234567"],
        dropped=[{"type": "email", "reason": "blocked_value"}],  # type: ignore[list-item]
        occurred_at_ms=1,
        resolved_at_ms=2,
        event=RAW,  # type: ignore[arg-type]
    )
    text = resolved.model_dump_json()
    assert json.loads(text)["event"]["attributes"]["total"] == "1290.00"
    assert ResolvedEvent.model_validate_json(text) == resolved


def test_profile_snapshot_keeps_money_exact_and_unknown_fields() -> None:
    snapshot = ProfileSnapshot.model_validate(
        {
            "profile_id": "p-1",
            "seq": 3,
            "identifiers": {
                "phone": [{"value": "+79161234567", "first_seen_ms": 1, "last_seen_ms": 2, "source": "pos"}]
            },
            "channels": {"store": {"count": 2, "last_seen_ms": 2}},
            "orders": {"count": 2, "revenue": {"RUB": "2580.10"}},
            "first_activity_ms": 1,
            "last_activity_ms": 2,
            "updated_at_ms": 2,
            "favourite_pizza": "pepperoni",  # a later personalisation field
        }
    )
    assert snapshot.status is ProfileStatus.ACTIVE
    dumped = json.loads(snapshot.model_dump_json())
    assert dumped["orders"]["revenue"] == {"RUB": "2580.10"}
    assert dumped["favourite_pizza"] == "pepperoni"
    assert ProfileSnapshot.model_validate_json(snapshot.model_dump_json()) == snapshot


CHANGES: dict[str, dict[str, Any]] = {
    "profile_created": {"identifiers": ["phone:+79161234567"]},
    "identifiers_attached": {"identifiers": ["email:ivan@mail.ru"]},
    "profiles_merged": {"survivor": "p-1", "merged": ["p-2"]},
    "merge_refused": {
        "reason": "too_many_phones",
        "rule": "max_phones",
        "candidates": ["p-2"],
        "identifiers": ["phone:+79161234567"],
    },
    "profile_split": {"new_profiles": ["p-3"], "reason": "operator"},
    "profile_erased": {"reason": "gdpr"},
}


@pytest.mark.parametrize("kind", sorted(CHANGES))
def test_identity_changes_discriminate_on_kind(kind: str) -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(IdentityChange)
    change = adapter.validate_python(
        {"kind": kind, "profile_id": "p-1", "seq": 4, "at_ms": 9, **CHANGES[kind]}
    )
    assert change.kind == kind and change.seq == 4
    assert adapter.validate_json(adapter.dump_json(change)) == change


def test_merge_refused_declares_the_identifiers_change_record_writes() -> None:
    from streams.core.graph import ChangeKind
    from streams.core.graph import IdentityChange as CoreChange
    from streams.publish import change_record

    refused = CoreChange(
        ChangeKind.REFUSED,
        "p-1",
        5,
        "e-9",
        10,
        {
            "rule": "generic_value",
            "detail": "value seen with too many distinct strong identifiers",
            "identifiers": ["phone:+74950000000"],
            "other_profile_id": None,
        },
    )
    record = change_record(refused)
    change = TypeAdapter(IdentityChange).validate_json(json.dumps(record))
    assert isinstance(change, MergeRefused)
    assert set(record) <= set(MergeRefused.model_fields)  # a declared field, not an `extra` one
    assert change.identifiers == ["phone:+74950000000"] and change.candidates == []
    schema = json.loads((generate.ROOT / "json" / "identity_change.json").read_text())
    assert schema["$defs"]["MergeRefused"]["properties"]["identifiers"]["type"] == "array"
    # records written before the field existed still validate, with no identifiers
    old = {k: v for k, v in record.items() if k != "identifiers"}
    assert MergeRefused.model_validate(old).identifiers == []


def test_every_field_change_record_writes_is_declared_in_its_model() -> None:
    """Downstream teams read the contract, not the code: nothing `identity.changes` carries is undeclared
    (0.3.3 wrote `identifiers` on refusals and `identifiers_moved` on merges as undeclared extras)."""
    from streams.core.graph import ChangeKind
    from streams.core.graph import IdentityChange as CoreChange
    from streams.publish import change_record

    payloads: dict[ChangeKind, dict[str, object]] = {
        ChangeKind.CREATED: {"identifiers": ["email:a@b.ru"], "anchor": "email:a@b.ru"},
        ChangeKind.ATTACHED: {"identifier": "phone:+79160000001", "bridge": ["email:a@b.ru"]},
        ChangeKind.MERGED: {
            "merged_profile_id": "p-2",
            "identifiers_moved": ["cookie_id:k1"],
            "bridge": ["email:a@b.ru"],
            "bridge_other": ["cookie_id:k1"],
        },
        ChangeKind.REFUSED: {
            "rule": "limit:email",
            "detail": "d",
            "identifiers": ["email:c@d.ru"],
            "other_profile_id": "p-3",
        },
        ChangeKind.SPLIT: {
            "split_profile_id": "p-4",
            "identifiers": ["phone:+79160000001"],
            "reason": "two people",
        },
        ChangeKind.ERASED: {},
    }
    assert set(payloads) == set(ChangeKind)
    for kind, payload in payloads.items():
        record = change_record(CoreChange(kind, "p-1", 2, "e-1", 10, payload))
        change = TypeAdapter(IdentityChange).validate_json(json.dumps(record))
        assert set(record) <= set(type(change).model_fields), (
            kind,
            set(record) - set(type(change).model_fields),
        )


def test_every_change_kind_has_a_model() -> None:
    assert set(CHANGES) == {k.value for k in IdentityChangeKind}


def test_identity_change_with_wrong_payload_is_refused() -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(IdentityChange).validate_python(
            {
                "kind": "profiles_merged",
                "profile_id": "p-1",
                "seq": 1,
                "at_ms": 1,
                "survivor": "p-1",
                "merged": [],
            }
        )


def test_dlq_record_carries_original_bytes_as_base64() -> None:
    original = b"\xff\xfe not json"
    record = DlqRecord(
        original_key_b64=None,
        original_value_b64=base64.b64encode(original).decode(),
        source_topic="raw.pos",
        partition=3,
        offset=42,
        error_code="not_utf8",
        message="invalid UTF-8 at byte 0",
        stage="validate",
        failed_at_ms=1,
    )
    restored = DlqRecord.model_validate_json(record.model_dump_json())
    assert base64.b64decode(restored.original_value_b64) == original
