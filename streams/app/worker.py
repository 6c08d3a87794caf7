"""The faust worker: thin glue running the partitioned stitching protocol (docs/stream-protocol.md) on Kafka.

Topology (every topic has N partitions; partition p of all of them belongs to one worker)::

    raw.<source> [p]           value: envelope-v1 JSON bytes
    <app>-internal [p]         value: protocol envelope {"v":2,"m":[msg, …]} for partition p
      │ stitch task            whole fetches of all input topics, each batch split by partition number p
      │   raw   → validate ─┬─▶ dlq                 DlqRecord: named code + original bytes
      │                     └─▶ protocol.ingest     Route to the anchor's partition (inline when it is p)
      │   internal → protocol.handle               Route / Apply / Claim / Merge* / Repoint / Release / Erase
      ├──▶ <app>-internal [q]   messages for other partitions, one envelope per (batch, p, q), or a few
      ├──▶ events.resolved      key: profile_id; each event exactly once, where its profile lives
      ├──▶ identity.changes     key: profile_id; seq per profile
      ├──▶ profiles             key: profile_id; one snapshot per changed profile per batch, tombstones
      └──▶ <app>-ids-changelog / <app>-profiles-changelog [p]   each changed row once per batch

Tables `ids` (identifier registers, owned by `part(k)`) and `profiles` (profile rows, homed at `home(P)`) live
in RocksDB through faust's `rocksdb://` store; a batch reads and writes the rows of partition p only, so they
are co-partitioned with the inputs by construction. Everything a batch of partition p produces, and its input
offsets, commit in one Kafka transaction (streams/app/transactions.py explains why not faust's).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import faust
from aiokafka import AIOKafkaProducer
from faust.stores.rocksdb import Store as RocksDBStore
from faust.types import ConsumerT, TableT
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from rocksdict import WriteBatch

from streams import metrics
from streams.app.fetch import Inbox, Record, in_time_order, install_bulk_fetch
from streams.app.protocol import Effects, PartitionState, Row, TableName
from streams.app.restore import (
    BOOKKEEPING_PREFIX,
    ChangelogRestorer,
    confine_faust_recovery_to_standbys,
    record_restored_offset,
    skip_faust_recovery,
)
from streams.app.steps import PartitionSteps
from streams.app.tabledb import share_table_memory
from streams.app.topics import MAX_RECORD_BYTES, internal_topic, raw_topic
from streams.app.transactions import (
    Admission,
    PartitionTransactions,
    fatal,
    wipe_tables_after_unclean_stop,
)
from streams.config import AppSettings
from streams.core.rules import Rules, load_rules
from streams.normalize import NormalizationSettings
from streams.produce import murmur2_partition
from streams.validate import Validator

__all__ = ["TABLES", "create_app"]

log = logging.getLogger(__name__)

# How often a batch waiting for faust's rebalance steps to end looks again.
RECOVERY_POLL_SECONDS = 0.05
TABLES: tuple[TableName, ...] = ("ids", "profiles")
PRODUCER_BATCH_BYTES = 1024 * 1024
# Keys of a table database that are not the table's rows: the restore's bookkeeping, and the offset faust
# writes into a database it keeps as a standby (still there when the partition becomes this worker's)
_NOT_ROWS = (BOOKKEEPING_PREFIX, RocksDBStore.offset_key)


class _TableRows:
    """`RowStore` over partition p's RocksDB databases of the faust tables (bytes in, bytes out)."""

    def __init__(self, tables: dict[TableName, TableT[bytes, bytes]], partition: int) -> None:
        self._tables = tables
        self._partition = partition

    def database(self, table: TableName) -> Any:
        """faust's RocksDB of this partition for `table` (one per assigned partition; `restore` fills it)."""
        return cast(Any, self._tables[table].data)._db_for_partition(self._partition)

    def get(self, table: TableName, key: bytes) -> bytes | None:
        value = self.database(table).get(key)
        return None if value is None else bytes(value)

    def keys(self, table: TableName, prefix: bytes) -> Iterable[bytes]:
        keys = self.database(table).keys(from_key=prefix)
        return [bytes(key) for key in itertools.takewhile(lambda key: key.startswith(prefix), keys)]

    def items(self, table: TableName, start: bytes) -> Iterable[tuple[bytes, bytes]]:
        for key, value in self.database(table).items(from_key=start):
            if not key.startswith(_NOT_ROWS):
                yield key, bytes(value)

    def write(self, rows: Sequence[Row]) -> None:
        """One RocksDB write batch per table: a put per row cost more than encoding the row."""
        batches: dict[TableName, WriteBatch] = {}
        for table, key, value in rows:
            batch = batches.get(table)
            if batch is None:
                batch = batches[table] = WriteBatch(raw_mode=True)
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        for table, batch in batches.items():
            self.database(table).write(batch)


class _Batch:
    """One partition's share of a batch: its records in, its records out, its next offsets to commit.

    Records are grouped by destination topic partition and handed to the producer as whole record batches:
    one coroutine per batch instead of one per record (aiokafka's per-record `send` dominated the profile).
    """

    def __init__(
        self, partition: int, partitions: int, producer: AIOKafkaProducer, changelogs: Collection[str]
    ) -> None:
        self.partition = partition
        self.partitions = partitions
        self.producer = producer
        self.effects = Effects()
        self.offsets: dict[tuple[str, int], int] = {}
        self.deliveries: list[asyncio.Future[Any]] = []
        self._records: dict[tuple[str, int], list[tuple[bytes | None, bytes | None]]] = defaultdict(list)
        self._changelogs = changelogs
        # (changelog, delivery, records in it): where the batch's rows landed, once it has committed
        self._row_deliveries: list[tuple[str, asyncio.Future[Any], int]] = []

    def add(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None) -> None:
        """Queue one record; `partition=None` places it by its key like Kafka's default partitioner."""
        if partition is None:
            partition = self.partition if key is None else _key_partition(key, self.partitions)
        self._records[(topic, partition)].append((key, value))

    async def send_all(self) -> None:
        """Hand every queued record to the transactional producer, in queue order per topic partition."""
        producer = self.producer
        for (topic, partition), records in self._records.items():
            batch = producer.create_batch()
            for key, value in records:
                if batch.append(key=key, value=value, timestamp=None) is not None:
                    continue
                if batch.record_count():
                    self._sent(topic, await producer.send_batch(batch, topic, partition=partition), batch)
                    batch = producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None) is None:  # larger than a batch
                    self._sent(topic, await producer.send(topic, value, key, partition=partition), None)
                    batch = producer.create_batch()
            if batch.record_count():
                self._sent(topic, await producer.send_batch(batch, topic, partition=partition), batch)
        self._records.clear()

    def _sent(self, topic: str, delivery: asyncio.Future[Any], batch: Any) -> None:
        self.deliveries.append(delivery)
        if topic in self._changelogs:
            self._row_deliveries.append((topic, delivery, 1 if batch is None else batch.record_count()))

    def last_row_offsets(self) -> dict[str, int]:
        """Each changelog's offset of the last row this batch wrote (its deliveries have completed)."""
        last: dict[str, int] = {}
        for topic, delivery, records in self._row_deliveries:
            # a batch's delivery reports its first record's offset, a single record's its own
            offset = delivery.result().offset + records - 1
            last[topic] = max(offset, last.get(topic, -1))
        return last


@functools.lru_cache(maxsize=1 << 16)
def _key_partition(key: bytes, partitions: int) -> int:
    """Java's murmur2 placement; cached because the keys are profile ids that repeat batch after batch."""
    return murmur2_partition(key, partitions)


class _StitchApp(faust.App):
    """A faust app that adapts its Kafka consumer the moment it is created, before any fetch or rebalance."""

    def __init__(self, *args: Any, on_consumer: Callable[[ConsumerT], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_consumer = on_consumer

    def _new_consumer(self) -> ConsumerT:
        consumer = super()._new_consumer()
        self._on_consumer(consumer)
        return consumer


def create_app(
    settings: AppSettings, normalization: NormalizationSettings | None = None, rules: Rules | None = None
) -> faust.App:
    """Build the worker app; all inputs are arguments, so tests can run several apps side by side."""
    metrics.observe_gc_pauses()
    validator = Validator(normalization or NormalizationSettings.from_env())
    rules = rules if rules is not None else load_rules(settings.rules_file)
    n = settings.partitions
    raw_names = [raw_topic(source) for source in settings.sources]
    internal = internal_topic(settings)
    # a batch is whatever was fetched while the previous one ran, up to `batch_max_records`, or what waits
    # once the oldest has waited `batch_linger_ms` (light load); the fetch pauses while two batches wait
    most = settings.batch_max_records
    inbox = Inbox(limit=2 * most, may_overflow=lambda: not stitching_allowed())
    linger = settings.batch_linger_ms / 1000

    def adapt_consumer(consumer: ConsumerT) -> None:
        txns.install(consumer)
        install_bulk_fetch(consumer, [*raw_names, internal], inbox)

    app = _StitchApp(
        settings.app_id,
        on_consumer=adapt_consumer,
        broker=f"kafka://{settings.bootstrap}",
        store="rocksdb://",
        datadir=str(settings.data_dir),
        processing_guarantee="exactly_once",
        topic_partitions=n,
        topic_replication_factor=settings.replication_factor,
        table_standby_replicas=settings.standby_replicas,
        web_port=settings.web_port,
        web_bind=settings.web_bind,
        key_serializer="raw",
        value_serializer="raw",
        producer_max_request_size=MAX_RECORD_BYTES,
        # one record batch per topic partition and transaction: aiokafka waits for a partition's previous
        # batch to be sent before queueing the next, so 16 KiB batches cost a round trip every ~10 profiles
        producer_max_batch_size=PRODUCER_BATCH_BYTES,
        # faust restores nothing (`skip_faust_recovery`): offsets it persisted in older tables are not a fault
        recovery_consistency_check=False,
    )
    wipe_tables_after_unclean_stop(Path(settings.data_dir), Path(app.conf.tabledir))
    skip_faust_recovery()
    # a worker holds each table partition at most once (owned or standby)
    table_memory = share_table_memory(settings.table_memory_mb << 20, len(TABLES) * n)
    metrics.TABLE_MEMORY_BYTES.set_function(table_memory.usage_bytes)
    metrics.TABLE_MEMORY_LIMIT_BYTES.set(table_memory.budget_bytes)
    # subscribed (and co-partitioned with the tables) through faust; read by the stitch task, not an agent
    app.topics.add(app.topic(*raw_names, internal, key_type=bytes, value_type=bytes))
    tables: dict[TableName, TableT[bytes, bytes]] = {
        # a deferred message's row holds a whole event: the changelogs take records as large as the internal
        # topic's (applies when faust creates them)
        name: app.Table(
            name,
            partitions=n,
            key_type=bytes,
            value_type=bytes,
            extra_topic_configs={"max.message.bytes": str(MAX_RECORD_BYTES)},
        )
        for name in TABLES
    }
    confine_faust_recovery_to_standbys(app, tables.values())
    changelogs = {name: table.changelog_topic.get_topic_name() for name, table in tables.items()}
    table_of = {changelog: name for name, changelog in changelogs.items()}
    steps = PartitionSteps(validator, internal, changelogs)
    states: dict[int, PartitionState] = {}
    txns = PartitionTransactions(app, internal, settings.bootstrap, on_rebalance=states.clear)
    restorer = ChangelogRestorer(settings.bootstrap)
    restored_generation = -1  # the consumer generation whose assigned partitions' tables are restored

    def state_for(partition: int) -> PartitionState:
        state = states.get(partition)
        if state is None:
            store = _TableRows(tables, partition)
            state = states[partition] = PartitionState(
                partition, n, rules, store, cache_rows=settings.cache_rows
            )
        return state

    def stitching_allowed() -> bool:
        """Not from a revocation (flow control suspended) until faust's rebalance steps have ended.

        A batch begun after a revocation would commit through a producer the new owner is about to fence.
        faust resumes flow control *before* its recovery step ends, hence both conditions. The tables are
        restored after that, by the stitch task (`restore_tables`).
        """
        return app.flow_control.is_active() and not app.in_recovery

    async def stitch() -> None:
        """Stitch what was fetched, a batch at a time, each batch split by partition number p.

        Records wait in the inbox while stitching is not allowed (`stitching_allowed`). Those fetched before
        the latest rebalance are dropped: every assigned partition is read again from its committed offset.
        """
        while True:
            records, generation = await inbox.take(most, linger)
            while True:
                await app.flow_control.acquire()
                if not stitching_allowed():
                    await asyncio.sleep(RECOVERY_POLL_SECONDS)
                    continue
                if restored_generation != app.consumer_generation_id:
                    await restore_tables()
                    continue
                async with txns.lock:
                    if txns.closing:
                        return
                    if not stitching_allowed():  # a rebalance began while we waited for the lock
                        continue
                    if generation != app.consumer_generation_id:
                        metrics.REDELIVERED_TOTAL.inc(len(records))
                        break
                    if restored_generation != generation:  # a rebalance came and went meanwhile
                        continue
                    try:
                        await _process(records)
                    except Exception as exc:  # a bug, not input (that goes to the DLQ)
                        log.exception("batch failed")
                        fatal(f"batch failed, exiting so the state is rebuilt from the changelogs: {exc!r}")
                    break

    app.task(stitch)

    async def restore_tables() -> None:
        """Bring the tables of every partition the current generation assigned up to their changelogs' ends.

        Outside the batch lock: a rebalance meanwhile leaves the databases consistent (each write batch holds
        its rows and the offset they reach), and the next generation restores again from there.
        """
        nonlocal restored_generation
        generation = app.consumer_generation_id
        partitions = sorted({tp.partition for tp in app.consumer.assignment() if tp.topic == internal})
        databases = {
            (changelogs[table], partition): _TableRows(tables, partition).database(table)
            for table in TABLES
            for partition in partitions
        }
        began = time.perf_counter()
        try:
            applied = await asyncio.to_thread(restorer.restore, databases)
        except Exception as exc:
            fatal(f"table restore failed, exiting so it starts over: {exc!r}")
        seconds = time.perf_counter() - began
        metrics.RESTORE_SECONDS.observe(seconds)
        log.info("restored %d changelog records for partitions %s in %.2f s", applied, partitions, seconds)
        if app.consumer_generation_id == generation:
            restored_generation = generation

    async def _process(batch: Sequence[Record]) -> None:
        # ((topic, p) → its records in offset order); a record of a partition we no longer own is skipped (its
        # new owner reads it from the offsets committed with p), a redelivery too, and a held one for now
        assigned = app.consumer.assignment()  # faust TPs, equal to (topic, partition) tuples
        by_input: dict[tuple[str, int], list[Record]] = defaultdict(list)
        positions = txns.positions
        for record in batch:
            tp = (record.topic, record.partition)
            if tp not in assigned:
                continue
            admission = positions.admit(*tp, record.offset)
            if admission is Admission.TAKE:
                by_input[tp].append(record)
            elif admission is Admission.REDELIVERED:
                metrics.REDELIVERED_TOTAL.inc()
            else:
                metrics.HELD_TOTAL.inc()
        await txns.reread_held()
        work: list[_Batch] = []
        txns.begin_batch()
        began = time.perf_counter()
        now_ms = int(time.time() * 1000)
        for partition, group in in_time_order(by_input).items():
            producer = txns.producer(partition)
            if producer is None:
                fatal(f"partition {partition} is assigned but has no transactional producer")
            part = _Batch(partition, n, cast(AIOKafkaProducer, producer), table_of)
            state = state_for(partition)
            for record in group:
                _handle(state, part, record, now_ms)
            await _publish(state, part, now_ms)
            work.append(part)
            metrics.BATCH_RECORDS.observe(len(group))
        handled = time.perf_counter()
        metrics.BATCH_SECONDS.labels("handle").observe(handled - began)
        # all partitions' records are in flight: commit them side by side (one round trip, not one each)
        await asyncio.gather(*(txns.commit(part.producer, part.deliveries, part.offsets) for part in work))
        txns.end_batch()
        for part in work:
            rows = _TableRows(tables, part.partition)
            for changelog, offset in part.last_row_offsets().items():
                record_restored_offset(rows.database(table_of[changelog]), offset)
        metrics.BATCH_SECONDS.labels("commit").observe(time.perf_counter() - handled)

    waits = {
        True: metrics.RECORD_WAIT_SECONDS.labels("internal"),
        False: metrics.RECORD_WAIT_SECONDS.labels("raw"),
    }

    def _handle(state: PartitionState, part: _Batch, record: Record, now_ms: int) -> None:
        part.offsets[(record.topic, record.partition)] = record.offset + 1
        value = record.value if record.value is not None else b""
        topic, partition, offset = record.topic, record.partition, record.offset
        if record.timestamp > 0:  # -1: no timestamp (a producer that set none)
            waits[topic == internal].observe(max(0.0, (now_ms - record.timestamp) / 1000))
        steps.take(state, part.effects, part, topic, partition, offset, record.key, value, now_ms)

    async def _publish(state: PartitionState, part: _Batch, now_ms: int) -> None:
        """Send what the partition's handlers produced, and its changed rows, in its transaction."""
        steps.publish(state, part.effects, part, now_ms)
        await part.send_all()

    @app.page("/metrics")
    async def prometheus(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(metrics.REGISTRY), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.on_before_shutdown.connect
    async def mark_clean_if_committed(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        """Runs once faust stopped fetching; the batch in flight (if any) commits first."""
        await txns.close(Path(settings.data_dir))

    return app
