"""The faust worker: thin glue that feeds Kafka messages to the validator and the stitching core.

Topology (at-least-once for now: faust 0.15.3's exactly-once is broken here, see docs/faust-notes.md)::

    raw.<source>            key: strongest identifier as sent; value: envelope-v1 JSON bytes
      │ validate agent      shard: the raw partition (all partitions, all workers, in parallel)
      ├──▶ dlq              invalid message: DlqRecord with a named code and the original bytes
      ▼
    <app>-stitch            value: NormalizedEvent.to_bytes(); ONE partition (interim, see README)
      │ stitch agent        shard: the single stitch partition; graph table co-partitioned with it
      ├──▶ events.resolved  key: profile_id
      ├──▶ identity.changes key: profile_id
      └──▶ profiles         key: profile_id (compacted; tombstone when merged away or erased)

The stitch stage runs the core over a faust table (RocksDB + changelog), flushing the core's write buffer
once per `take_events()` batch, before the batch is acked, so no committed offset runs ahead of the graph.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any, cast

import faust
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streams import metrics
from streams.app.topics import DLQ_MAX_MESSAGE_BYTES, raw_topic
from streams.config import AppSettings
from streams.core.graph import ChangeKind, IdentityGraph
from streams.core.rules import Rules
from streams.core.state import ProfileState
from streams.events import NormalizedEvent
from streams.exceptions import InvalidEvent
from streams.normalize import NormalizationSettings
from streams.publish import change_record, dlq_record, dumps, profile_record, resolved_record
from streams.validate import Validator

__all__ = ["TableStore", "create_app"]

# Events per stitch batch, and the longest a partial batch waits: one graph flush and one round of sends
# per batch amortises faust's per-write overhead, while 100 ms keeps the latency target in reach.
BATCH_SIZE = 1000
BATCH_WITHIN_SECONDS = 0.1


class TableStore:
    """The core's Store interface over a faust Table: every write is changelogged in the open transaction."""

    def __init__(self, table: Any) -> None:
        self._table = table

    def get(self, key: bytes) -> bytes | None:
        value = self._table.get(key)
        return None if value is None else bytes(value)

    def put(self, key: bytes, value: bytes) -> None:
        self._table[key] = value

    def delete(self, key: bytes) -> None:
        if key in self._table:
            del self._table[key]

    def write_batch(self, items: Iterable[tuple[bytes, bytes | None]]) -> None:
        for key, value in items:
            if value is None:
                self.delete(key)
            else:
                self._table[key] = value

    def iter_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        yield from sorted((k, bytes(v)) for k, v in self._table.items() if k.startswith(prefix))

    def close(self) -> None:
        """The table belongs to the app; nothing to release here."""


def create_app(
    settings: AppSettings, normalization: NormalizationSettings | None = None, rules: Rules | None = None
) -> faust.App:
    """Build the worker app; all inputs are arguments, so tests can run several apps side by side."""
    validator = Validator(normalization or NormalizationSettings.from_env())
    app = faust.App(
        settings.app_id,
        broker=f"kafka://{settings.bootstrap}",
        store="rocksdb://",
        datadir=str(settings.data_dir),
        processing_guarantee="at_least_once",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        table_standby_replicas=settings.standby_replicas,
        web_port=settings.web_port,
        web_bind="127.0.0.1",
        key_serializer="raw",
        value_serializer="raw",
        producer_max_request_size=DLQ_MAX_MESSAGE_BYTES,
    )
    raw = app.topic(*(raw_topic(source) for source in settings.sources), key_type=bytes, value_type=bytes)
    dlq = app.topic("dlq", key_type=bytes, value_type=bytes)
    stitch_in = app.topic(
        f"{settings.app_id}-stitch", partitions=1, internal=True, key_type=bytes, value_type=bytes
    )
    resolved = app.topic("events.resolved", key_type=bytes, value_type=bytes)
    changes_out = app.topic("identity.changes", key_type=bytes, value_type=bytes)
    profiles_out = app.topic("profiles", key_type=bytes, value_type=bytes)
    graph_table = app.Table("graph", partitions=1, key_type=bytes, value_type=bytes)
    graph_holder: dict[str, IdentityGraph] = {}

    @app.agent(raw)
    async def validate(stream: faust.StreamT[bytes]) -> None:
        """Shard key: raw partition. Valid events go on to the stitch stage, invalid ones to the DLQ."""
        async for event in stream.events():
            message = event.message
            value = event.value if isinstance(event.value, bytes) else b""
            try:
                normalized = validator.validate(value)
            except InvalidEvent as exc:
                metrics.DLQ_TOTAL.labels("validate", exc.code.value).inc()
                record = dlq_record(
                    key=event.key if isinstance(event.key, bytes) else None,
                    value=value,
                    topic=message.topic,
                    partition=message.partition,
                    offset=message.offset,
                    code=exc.code.value,
                    message=exc.message,
                    stage="validate",
                    failed_at_ms=int(time.time() * 1000),
                )
                await dlq.send(key=event.key, value=dumps(record))
                continue
            metrics.EVENTS_IN_TOTAL.labels(normalized.source, normalized.type).inc()
            for type_, reason in normalized.dropped:
                metrics.IDENTIFIERS_DROPPED_TOTAL.labels(type_, reason).inc()
            # (event_id, NormalizedEvent bytes: normalised and, if enabled, hashed identifiers only)
            await stitch_in.send(key=normalized.event_id.encode(), value=normalized.to_bytes())

    @app.agent(stitch_in)
    async def stitch(events: faust.StreamT[bytes]) -> None:
        """Shard key: the single stitch partition, co-partitioned with the `graph` table."""
        stream = cast(faust.Stream[bytes], events)  # take_events() is on the concrete Stream only
        async for batch in stream.take_events(BATCH_SIZE, within=BATCH_WITHIN_SECONDS):
            # take_events() leaves no current event, and table writes need one to pick their changelog
            # partition (faust raises "outside of stream iteration"): pin the batch's last event.
            stream._set_current_event(batch[-1])
            graph = graph_holder.get("graph")
            if graph is None:
                # built after table recovery, so the core's caches start from the changelogged state
                graph = graph_holder["graph"] = IdentityGraph(TableStore(graph_table), rules, history=False)
            now_ms = int(time.time() * 1000)
            touched: dict[str, None] = {}
            for message in batch:
                event = NormalizedEvent.from_bytes(message.value)
                result = graph.link(event)
                for change in result.changes:
                    touched[change.profile_id] = None
                    if change.kind is ChangeKind.MERGED:
                        metrics.MERGES_TOTAL.inc()
                        touched[change.payload["merged_profile_id"]] = None
                    elif change.kind is ChangeKind.REFUSED:
                        metrics.MERGES_REFUSED_TOTAL.labels(change.payload["rule"]).inc()
                    await changes_out.send(key=change.profile_id.encode(), value=dumps(change_record(change)))
                key = result.profile_id.encode() if result.profile_id else None
                if result.profile_id:
                    touched[result.profile_id] = None
                await resolved.send(key=key, value=dumps(resolved_record(event, result.profile_id, now_ms)))
                metrics.EVENTS_RESOLVED_TOTAL.inc()
                metrics.EVENT_LAG_SECONDS.observe(max(0.0, (now_ms - event.occurred_at_ms) / 1000))
            graph.flush()
            # merged-away ids resolve to their survivor: tombstone them, snapshot the survivor once
            latest: dict[str, ProfileState] = {}
            for profile_id in touched:
                profile = graph.profile(profile_id)
                if profile is None:
                    continue
                if profile.id != profile_id:
                    await profiles_out.send(key=profile_id.encode(), value=None)
                latest[profile.id] = profile
            for profile_id, profile in latest.items():
                snapshot = profile_record(profile, now_ms)
                await profiles_out.send(
                    key=profile_id.encode(), value=None if snapshot is None else dumps(snapshot)
                )

    @app.on_partitions_revoked.connect
    def forget_graph(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        """Another worker may own the stitch partition next: never reuse a cache it could make stale."""
        graph_holder.clear()

    @app.page("/metrics")
    async def prometheus(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(metrics.REGISTRY), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    return app
