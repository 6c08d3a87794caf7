"""One partition's share of a batch, without Kafka: input records → protocol → output records.

The worker (streams/app/worker.py) runs these steps inside partition p's transaction and hands the output to
its transactional producer; `bench/bench_worker.py` runs the very same steps in memory, so the CPU an event
costs before any Kafka I/O can be measured on its own, repeatably.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

from streams import metrics
from streams.app.protocol import (
    Effects,
    PartitionState,
    TableName,
    decode_envelope,
    encode_envelopes,
    handle,
    ingest,
)
from streams.core.graph import ChangeKind
from streams.exceptions import ErrorCode, InvalidEvent
from streams.publish import change_record, dlq_record, dumps, profile_record, resolved_record
from streams.validate import Validator

__all__ = ["Outbox", "PartitionSteps"]


class Outbox(Protocol):
    """Where a partition's output records go (the worker's transactional batch, or the benchmark's lists)."""

    def add(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None) -> None:
        """Queue one record; `partition=None` places it by its key like Kafka's default partitioner."""


class PartitionSteps:
    """`take` each input record of partition p's batch into one `Effects`, then `publish` them once."""

    def __init__(self, validator: Validator, internal: str, changelogs: dict[TableName, str]) -> None:
        self.validator = validator
        self.internal = internal
        self.changelogs = changelogs
        # per-batch counts, added to the metrics once per `publish`: a labelled counter costs a lock and a
        # dict lookup each time, which per event was a few percent of the worker's CPU
        self._events_in: Counter[tuple[str, str]] = Counter()
        self._identifiers_dropped: Counter[tuple[str, str]] = Counter()

    def take(
        self,
        state: PartitionState,
        fx: Effects,
        out: Outbox,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes,
        now_ms: int,
    ) -> None:
        """One input record: an internal envelope's messages, or a raw event (stitched, or dead-lettered)."""
        if topic == self.internal:
            try:
                msgs = decode_envelope(value)
            except (ValueError, TypeError, KeyError, IndexError) as exc:  # orjson's errors are ValueErrors
                # only workers write there, but one foreign record must not stop the partition for good
                _dead_letter(
                    out,
                    ErrorCode.BAD_ENVELOPE,
                    str(exc),
                    "internal",
                    key,
                    value,
                    topic,
                    partition,
                    offset,
                    now_ms,
                )
                return
            for msg in msgs:
                handle(state, msg, fx)
            return
        try:
            normalized = self.validator.validate(value)
        except InvalidEvent as exc:
            _dead_letter(out, exc.code, exc.message, "validate", key, value, topic, partition, offset, now_ms)
            return
        self._events_in[(normalized.source, normalized.type)] += 1
        for dropped in normalized.dropped:
            self._identifiers_dropped[dropped] += 1
        ingest(state, normalized, fx)

    def publish(self, state: PartitionState, fx: Effects, out: Outbox, now_ms: int) -> None:
        """Everything `fx` holds, and the partition's changed rows, as records for p's transaction."""
        internal = self.internal
        for dest, msgs in fx.sends.items():
            # (destination partition → its messages, in handling order): one envelope each, or a few in order
            for envelope in encode_envelopes(msgs):
                out.add(internal, str(dest).encode(), envelope, partition=dest)
        for change in fx.changes:
            if change.kind is ChangeKind.MERGED:
                metrics.MERGES_TOTAL.inc()
            elif change.kind is ChangeKind.REFUSED:
                metrics.MERGES_REFUSED_TOTAL.labels(change.payload["rule"]).inc()
            out.add("identity.changes", change.profile_id.encode(), dumps(change_record(change)))
        lags = metrics.EVENT_LAG_SECONDS
        for resolved in fx.resolved:
            event = resolved.event
            key = resolved.profile_id.encode() if resolved.profile_id else None
            record = resolved_record(event, resolved.profile_id, now_ms, resolved.anchor)
            out.add("events.resolved", key, dumps(record))
            lags.observe(max(0.0, (now_ms - event.occurred_at_ms) / 1000))
        metrics.EVENTS_RESOLVED_TOTAL.inc(len(fx.resolved))
        for profile_id in fx.profiles:
            row = state.get_profile(profile_id)
            snapshot = None if row is None else profile_record(row.state, now_ms)
            out.add("profiles", profile_id.encode(), None if snapshot is None else dumps(snapshot))
        for reason, count in fx.dropped.items():
            metrics.PROTOCOL_DROPPED_TOTAL.labels(reason).inc(count)
        for table, key, value in state.flush():
            out.add(self.changelogs[table], key, value, partition=state.partition)
        metrics.HOLDERS_INDEX_COMPLETE.labels(str(state.partition)).set(state.holders_indexed)
        for (source, type_), count in self._events_in.items():
            metrics.EVENTS_IN_TOTAL.labels(source, type_).inc(count)
        for (type_, reason), count in self._identifiers_dropped.items():
            metrics.IDENTIFIERS_DROPPED_TOTAL.labels(type_, reason).inc(count)
        self._events_in.clear()
        self._identifiers_dropped.clear()


def _dead_letter(
    out: Outbox,
    code: ErrorCode,
    message: str,
    stage: str,
    key: bytes | None,
    value: bytes,
    topic: str,
    partition: int,
    offset: int,
    now_ms: int,
) -> None:
    metrics.DLQ_TOTAL.labels(stage, code.value).inc()
    dead = dlq_record(
        key=key,
        value=value,
        topic=topic,
        partition=partition,
        offset=offset,
        code=code.value,
        message=message,
        stage=stage,
        failed_at_ms=now_ms,
    )
    out.add("dlq", key, dumps(dead))
