"""The worker's per-partition steps (streams/app/steps.py) without Kafka: what a batch turns into records."""

from __future__ import annotations

import base64
import json
from typing import Any

import orjson
import pytest

from streams import metrics
from streams.app import protocol
from streams.app.protocol import (
    ENVELOPE_MOST_BYTES,
    Effects,
    IdRow,
    MemoryRowStore,
    PartitionState,
    TableName,
    decode_envelope,
)
from streams.app.steps import PartitionSteps
from streams.core import load_rules
from streams.normalize import NormalizationSettings
from streams.validate import Validator

INTERNAL = "app-internal"
CHANGELOGS: dict[TableName, str] = {"ids": "app-ids-changelog", "profiles": "app-profiles-changelog"}


class _Records:
    """An outbox that keeps every record."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes | None, int | None]] = []

    def add(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None) -> None:
        self.records.append((topic, key, value, partition))

    def on(self, topic: str) -> list[tuple[bytes | None, bytes | None, int | None]]:
        return [(k, v, p) for t, k, v, p in self.records if t == topic]


def _raw(event_id: str, cookie: str, note_bytes: int = 0) -> bytes:
    doc: dict[str, Any] = {
        "schema_version": 1,
        "event_id": event_id,
        "source": "web",
        "channel": "web",
        "type": "page_view",
        "occurred_at": "2026-11-20T10:00:00Z",
        "identifiers": [{"type": "cookie_id", "value": cookie}],
        "attributes": {"url": "https://shop.ru/menu", "note": "x" * note_bytes},
    }
    return json.dumps(doc).encode()


def _batch(partition: int, records: list[tuple[str, bytes]]) -> _Records:
    """One batch of partition `partition` of 8: take each (topic, value), then publish."""
    steps = PartitionSteps(Validator(NormalizationSettings()), INTERNAL, dict(CHANGELOGS))
    state = PartitionState(partition, 8, load_rules())
    fx = Effects()
    out = _Records()
    for offset, (topic, value) in enumerate(records):
        steps.take(state, fx, out, topic, partition, offset, None, value, 0)
    steps.publish(state, fx, out, 0)
    return out


def test_a_record_on_the_internal_topic_that_no_worker_wrote_is_dead_lettered() -> None:
    junk = b"not an envelope"
    out = _batch(3, [(INTERNAL, junk), (INTERNAL, b'{"v":1,"m":[[99]]}'), ("raw.web", _raw("e1", "k1"))])
    dead = [orjson.loads(v or b"") for _, v, _ in out.on("dlq")]
    assert [(d["error_code"], d["stage"], d["source_topic"], d["offset"]) for d in dead] == [
        ("bad_envelope", "internal", INTERNAL, 0),
        ("bad_envelope", "internal", INTERNAL, 1),
    ]
    assert base64.b64decode(dead[0]["original_value_b64"]) == junk
    assert len(out.on("events.resolved")) + len(out.on(INTERNAL)) >= 1  # the batch went on: e1 was taken


def test_a_batch_of_large_events_for_another_partition_travels_in_several_envelopes() -> None:
    """300 events of 30 KB for one cookie: 0.3.3 sent them as one 9 MB record, past the internal topic's
    8 MiB limit, so the transaction failed on every restart."""
    events = [("raw.web", _raw(f"e{n}", "ck-big-1", 30_000)) for n in range(300)]
    homes = {p for p in range(8) if _batch(p, events[:1]).on("events.resolved")}
    (home,) = homes  # the one partition that resolves them itself
    elsewhere = (home + 1) % 8
    out = _batch(elsewhere, events)
    envelopes = out.on(INTERNAL)
    assert len(envelopes) > 8
    assert {p for _, _, p in envelopes} == {home}
    assert all(len(v or b"") <= ENVELOPE_MOST_BYTES for _, v, _ in envelopes)
    routed = [m for _, v, _ in envelopes for m in decode_envelope(v or b"")]
    assert [m.ev.event_id for m in routed] == [f"e{n}" for n in range(300)]  # type: ignore[attr-defined]


def test_a_partition_indexing_old_registers_shows_on_a_gauge_until_it_is_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three registers as 0.4.1 left them (no holders index), one register indexed per batch here: the gauge
    reads 0 while the partition is being indexed and 1 once every register is in the index."""
    monkeypatch.setattr(protocol, "INDEX_STEP_REGISTERS", 1)
    rows = {f"email:p{i}@x.ru".encode(): IdRow(f"P{i}", False, [i + 1]).encode() for i in range(3)}
    state = PartitionState(5, 8, load_rules(), MemoryRowStore({"ids": rows, "profiles": {}}))
    steps = PartitionSteps(Validator(NormalizationSettings()), INTERNAL, dict(CHANGELOGS))
    seen = []
    for _ in range(3):
        steps.publish(state, Effects(), _Records(), 0)
        seen.append(
            metrics.REGISTRY.get_sample_value("omnistitch_holders_index_complete", {"partition": "5"})
        )
    assert seen == [0, 0, 1]
