"""Table rows restored from their changelogs by the worker itself, before the first batch of a generation.

faust's table recovery cannot be trusted across rebalances (docs/faust-notes.md §12): it applies records of
a partition revoked mid-restore and marks them restored, and its "aborted transaction" shortcut can end a
restore it never did, so a partition came back with rows missing or stale under a persisted offset that
claimed otherwise. So faust restores nothing (`skip_faust_recovery`), and `ChangelogRestorer` brings every
assigned partition's databases up to the end of its changelogs itself, reading `read_committed` from the
offset it last restored to (kept in the database, written in the same batch as the rows).

Why starting there is enough: a database holds the changelog up to that offset, plus rows this worker wrote
itself in batches that committed (a batch that did not commit ends the process, and the next start wipes the
tables). Every later changelog record, its own or another owner's, is applied again in order, so the rows end
equal to the changelog's. After each committed batch the worker moves the offset past its own rows
(`record_restored_offset`), so a partition that stays with it is not read again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, cast

import faust
from confluent_kafka import OFFSET_BEGINNING
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.types import TableT
from rocksdict import WriteBatch

from streams.topic_reader import committed_messages, end_offsets, topic_ids

__all__ = [
    "BOOKKEEPING_PREFIX",
    "CHANGELOG_ID_KEY",
    "RESTORED_OFFSET_KEY",
    "ChangelogRestorer",
    "StandbyOnlyBuffer",
    "confine_faust_recovery_to_standbys",
    "record_restored_offset",
    "skip_faust_recovery",
]

# Keys of a database's own bookkeeping, beside the table's rows (never on the changelog).
BOOKKEEPING_PREFIX = b"__omnistitch\x00"
# The offset up to which a database holds its changelog (a decimal string), set by restores and batches.
RESTORED_OFFSET_KEY = BOOKKEEPING_PREFIX + b"restored__"
# The id of the changelog topic the rows came from (a topic created again under the same name has another).
CHANGELOG_ID_KEY = BOOKKEEPING_PREFIX + b"changelog-id__"
# Records per RocksDB write batch (each batch also moves the restored offset).
WRITE_BATCH_RECORDS = 5_000
# A restore that has not reached every changelog end by then fails the worker (state is rebuilt on restart).
RESTORE_TIMEOUT_SECONDS = 600.0

log = logging.getLogger(__name__)


def skip_faust_recovery() -> None:
    """Make faust's recovery see every changelog as empty, so it neither restores nor waits for anything.

    Process-wide and idempotent. Changelog partitions then stay paused and faust applies nothing to the
    tables of active partitions; `ChangelogRestorer` does the restoring.
    """

    async def empty_changelogs(self: Any, partitions: list[Any]) -> Mapping[Any, int]:
        return dict.fromkeys(partitions, 0)

    AIOKafkaConsumerThread._highwaters = empty_changelogs  # type: ignore[method-assign]


class StandbyOnlyBuffer(list[Any]):
    """faust's recovery buffer of one table that takes only records of this table's standby partitions.

    faust still maintains standby replicas, but must never write to an active partition's database: the worker
    restores those itself, and a late record applied after that would turn a row back. faust 0.15.3 also
    applied records of partitions it tracked no longer: `Recovery._slurp_changelogs` logs "recovery unknown
    topic" for them and goes on with the previous record's table and buffer (docs/faust-notes.md §12).
    """

    def __init__(self, recovery: Any, changelog_topic: str) -> None:
        super().__init__()
        self._recovery = recovery
        self._topic = changelog_topic

    def append(self, event: Any) -> None:
        tp = event.message.tp
        if tp.topic == self._topic and tp in self._recovery.standby_tps:
            super().append(event)


def confine_faust_recovery_to_standbys(app: faust.App, tables: Iterable[TableT[Any, Any]]) -> None:
    """Give each table's recovery a `StandbyOnlyBuffer`; before the worker starts (faust keeps them)."""
    recovery: Any = cast(Any, app.tables).recovery
    for table in tables:
        recovery.buffers[table] = StandbyOnlyBuffer(recovery, table.changelog_topic.get_topic_name())


def record_restored_offset(db: Any, offset: int) -> None:
    """Note that `db` holds its changelog up to `offset`: once a batch whose last row there is at `offset` has
    committed (the owner is the changelog partition's only writer, so nothing else lies before it)."""
    db.put(RESTORED_OFFSET_KEY, str(offset).encode())


def _wipe(db: Any) -> None:
    """Delete every row of a table database, in one batch."""
    batch = WriteBatch(raw_mode=True)
    for key in db.keys():  # noqa: SIM118 - an Rdict iterates by index, keys() by key
        batch.delete(key)
    db.write(batch)


class ChangelogRestorer:
    """Applies changelog records to RocksDB databases, each from where its last restore ended to the end."""

    def __init__(self, bootstrap: str) -> None:
        self._bootstrap = bootstrap

    def restore(self, databases: Mapping[tuple[str, int], Any]) -> int:
        """Bring each database, keyed by (changelog topic, partition), up to its changelog's end; blocking.

        Returns the number of records applied. The producers of these partitions must have been started (so
        fenced) by the current owner: then nothing is left in flight, and the end read is final.
        """
        starts: dict[tuple[str, int], int] = {}
        pending: dict[tuple[str, int], tuple[WriteBatch, int]] = {}
        ends = end_offsets(self._bootstrap, databases)
        ids = topic_ids(self._bootstrap, (topic for topic, _ in databases))
        for key, db in databases.items():
            restored = db.get(RESTORED_OFFSET_KEY)
            changelog = ids[key[0]].encode()
            held = db.get(CHANGELOG_ID_KEY)
            # rows from another log than this changelog (its topic recreated, another cluster) belong to no
            # one now: rebuilt from the log. Seen by the topic's id; in a database from before ids were kept,
            # by an offset past the log's end.
            if (held is not None and held != changelog) or (
                restored is not None and int(restored) >= ends[key]
            ):
                log.warning(
                    "%s[%d]: the database holds rows of another log; rebuilding from the changelog", *key
                )
                _wipe(db)
                restored = None
            if held != changelog:
                db.put(CHANGELOG_ID_KEY, changelog)
            starts[key] = int(restored) + 1 if restored is not None else OFFSET_BEGINNING
            pending[key] = (WriteBatch(raw_mode=True), -1)
        applied = 0
        for message in committed_messages(self._bootstrap, starts, RESTORE_TIMEOUT_SECONDS):
            key = (message.topic() or "", message.partition() or 0)
            batch, _ = pending[key]
            row_key, value, offset = message.key() or b"", message.value(), message.offset() or 0
            if value is None:
                batch.delete(row_key)
            else:
                batch.put(row_key, value)
            applied += 1
            pending[key] = (batch, offset)
            if len(batch) >= WRITE_BATCH_RECORDS:
                self._write(databases[key], batch, offset)
                pending[key] = (WriteBatch(raw_mode=True), -1)
        for key, (batch, offset) in pending.items():
            self._write(databases[key], batch, offset)
        return applied

    @staticmethod
    def _write(db: Any, batch: WriteBatch, last_offset: int) -> None:
        """Write the rows and the offset they reach in one atomic batch (nothing when nothing was read)."""
        if last_offset < 0:
            return
        batch.put(RESTORED_OFFSET_KEY, str(last_offset).encode())
        db.write(batch)
