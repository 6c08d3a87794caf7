"""Exactly-once on faust-streaming 0.15.3, done by us: one Kafka transaction per input partition and batch.

faust's own exactly-once is broken in ways docs/faust-notes.md reproduces: records go into the transaction of
their *destination* partition (or none), its timer commits acked offsets in the middle of a batch, commit
errors are logged and swallowed, and local RocksDB keeps writes of aborted transactions. We keep what works
(group membership, co-partitioned assignment, one transactional producer per partition started and fenced
on every rebalance, the tables' RocksDB databases) and take over the rest:

1. faust's offset commit is disabled: offsets are committed *only* by `PartitionTransactions.commit`, in the
   same transaction as every record the batch produced (outputs, envelopes, DLQ, table changelogs);
2. a batch holds `lock` from its first read to its commit, and faust's rebalance steps that stop and start
   transactional producers wait for it, so producers never change under a batch;
3. we track each input partition's position ourselves (`InputPositions`): read from the group's committed
   offsets right after a rebalance has fenced the previous owners, advanced by each record taken. A record
   below it is a redelivery (faust re-seeks and re-sends around rebalances) and is skipped; so is a record of
   a partition we no longer own. A record *ahead* of a position not yet confirmed waits until a re-read from
   the position shows nothing lies between: faust can lose records around a rebalance, so a batch never
   takes a record it cannot prove follows the last one taken (docs/faust-notes.md §11);
4. any transaction error is fatal: the process exits at once, without marking a clean stop, so the next
   start rebuilds local tables from the committed changelogs (`wipe_tables_after_unclean_stop`);
5. tables are restored by the worker (`streams/app/restore.py`), not by faust's recovery, which restored
   nothing under exactly-once (it read changelog ends from a cached offset, -1 for a partition just assigned)
   and, around rebalances, marked rows restored that it had not restored (docs/faust-notes.md §12);
   faust's recovery loop runs for standby replicas only (`confine_faust_recovery_to_standbys`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import faust
from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition
from confluent_kafka import Consumer
from confluent_kafka import TopicPartition as KafkaTopicPartition
from faust.types import TP, ConsumerT

__all__ = [
    "CLEAN_STOP_MARKER",
    "Admission",
    "InputPositions",
    "PartitionTransactions",
    "mark_clean_stop",
    "wipe_tables_after_unclean_stop",
]

log = logging.getLogger(__name__)

CLEAN_STOP_MARKER = "clean-stop"
# Exit status of a worker that stopped on a transaction error (EX_SOFTWARE): restart it, state is rebuilt.
FATAL_EXIT_STATUS = 70


TopicPartitionKey = tuple[str, int]


class Admission(enum.Enum):
    """What a batch does with a fetched input record."""

    TAKE = "take"
    REDELIVERED = "redelivered"  # below the position: taken (and committed) before
    HELD = "held"  # ahead of an unconfirmed position: waits for the re-read from the position


class InputPositions:
    """The next offset to take per input partition, and proof that nothing before a taken record was skipped.

    Right after a rebalance a partition's position (its committed offset) is unconfirmed: records can be lost
    between the fetch and a batch around rebalances (the fetch loop drops those of partitions faust paused,
    the inbox those of an older generation; docs/faust-notes.md §11), so the first record seen may lie past
    some never delivered. Only a record *at* the position confirms it. A record further ahead is held, and
    the partition is re-read from the position (`take_seeks`); once a record at most as far as the held one
    comes back, the offsets between were transaction markers or aborted records, never data. On `gapless`
    topics (raw inputs written without transactions, so consecutive offsets) every jump is checked that way.
    """

    def __init__(self, gapless: Callable[[str], bool]) -> None:
        self._gapless = gapless
        self._next: dict[TopicPartitionKey, int] = {}
        self._unconfirmed: set[TopicPartitionKey] = set()
        # partition → offset of the first record held; records up to it can only come from the re-read
        self._held_from: dict[TopicPartitionKey, int] = {}
        self._seeks: dict[TopicPartitionKey, int] = {}

    def reset(
        self, committed: Mapping[TopicPartitionKey, int], assigned: Iterable[TopicPartitionKey]
    ) -> None:
        """After a rebalance: each assigned partition restarts, unconfirmed, at its committed offset or 0."""
        assigned = list(assigned)
        self._next = {tp: committed.get(tp, 0) for tp in assigned}
        self._unconfirmed = set(assigned)
        self._held_from.clear()
        self._seeks.clear()

    def admit(self, topic: str, partition: int, offset: int) -> Admission:
        """Whether a batch takes the record at `offset`; taking it moves the position past it."""
        tp = (topic, partition)
        expected = self._next.get(tp, 0)
        if offset < expected:
            return Admission.REDELIVERED
        if offset > expected and (tp in self._unconfirmed or self._gapless(topic)):
            held_from = self._held_from.get(tp)
            if held_from is None:
                self._held_from[tp] = offset
                self._seeks[tp] = expected
                return Admission.HELD
            if offset > held_from:
                return Admission.HELD  # fetched before the re-read began
        self._unconfirmed.discard(tp)
        self._held_from.pop(tp, None)
        self._seeks.pop(tp, None)
        self._next[tp] = offset + 1
        return Admission.TAKE

    def take_seeks(self) -> dict[TopicPartitionKey, int]:
        """Partitions to re-read, and from where (each asked for once)."""
        seeks, self._seeks = self._seeks, {}
        return seeks


class PartitionTransactions:
    """Commits a batch's records and input offsets of one partition atomically, with faust's producers."""

    def __init__(
        self, app: faust.App, input_topic: str, bootstrap: str, on_rebalance: Callable[[], None]
    ) -> None:
        self._app = app
        self._bootstrap = bootstrap
        self.positions = InputPositions(gapless=lambda topic: topic != input_topic)
        self._input_topic = input_topic
        self._on_rebalance = on_rebalance
        self.lock = asyncio.Lock()
        # True while local tables hold writes no transaction has committed yet (a stop then is unclean)
        self._dirty = False
        self._marker: Path | None = None
        self._closing = False

    @property
    def closing(self) -> bool:
        """True once the worker stops: no batch starts any more (uncommitted input is read again later)."""
        return self._closing

    async def close(self, data_dir: Path) -> None:
        """Wait for the batch in flight to commit, start no other, and mark the stop clean if it is."""
        async with self.lock:
            self._closing = True
            if not self._dirty:
                self._marker = mark_clean_stop(data_dir)

    def begin_batch(self) -> None:
        """Local rows are about to change ahead of their commit: a stop from here on is unclean."""
        self._dirty = True
        if self._marker is not None:
            self._marker.unlink(missing_ok=True)
            self._marker = None

    def end_batch(self) -> None:
        """Every row written so far is committed."""
        self._dirty = False

    def install(self, consumer: ConsumerT) -> None:
        """Disable faust's commits on `consumer` and fence its rebalance steps off from batches.

        Runs when faust creates the consumer, before its first rebalance: positions are read at every one.
        """

        async def commit_nothing(*args: Any, **kwargs: Any) -> bool:
            return False  # offsets are committed inside our transactions only

        consumer.commit = commit_nothing  # type: ignore[method-assign]
        transactions: Any = consumer.transactions
        transactions.on_partitions_revoked = self._guarded(transactions.on_partitions_revoked)
        transactions.on_rebalance = self._guarded(transactions.on_rebalance, refresh_positions=True)

    def _guarded(
        self, step: Callable[..., Awaitable[Any]], *, refresh_positions: bool = False
    ) -> Callable[..., Awaitable[Any]]:
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            async with self.lock:
                self._on_rebalance()  # caches of partitions that may move must go
                result = await step(*args, **kwargs)
                if refresh_positions:
                    # `on_rebalance(assigned, revoked, newly_assigned)` has started (and so fenced) the
                    # producers of every assigned partition: their committed offsets are final now
                    assigned = [(tp.topic, tp.partition) for tp in args[0]]
                    self.positions.reset(await asyncio.to_thread(self._committed, assigned), assigned)
                return result

        return guarded

    def _committed(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """The group's committed offsets (an OffsetFetch only: this consumer never joins the group)."""
        reader = Consumer({"bootstrap.servers": self._bootstrap, "group.id": self._app.conf.id})
        try:
            found = reader.committed([KafkaTopicPartition(t, p) for t, p in partitions], timeout=30)
        finally:
            reader.close()
        return {(tp.topic, tp.partition): tp.offset for tp in found if tp.offset >= 0}

    async def reread_held(self) -> None:
        """Seek the partitions whose records are held back to their positions (`InputPositions`)."""
        consumer = self._app.consumer
        for (topic, partition), offset in self.positions.take_seeks().items():
            log.info("records of %s[%d] held: reading it again from offset %d", topic, partition, offset)
            try:
                await consumer.seek(TP(topic, partition), offset)
            except Exception as exc:  # revoked meanwhile: the rebalance resets the positions anyway
                log.warning("could not re-read %s[%d] from %d: %r", topic, partition, offset, exc)

    def transactional_id(self, partition: int) -> str:
        """faust's id for the producer of `partition` of our topic group (the one its rebalance fences)."""
        group = self._app.assignor.group_for_topic(self._input_topic)
        return f"{self._app.conf.id}-{group}-{partition}"

    def producer(self, partition: int) -> AIOKafkaProducer | None:
        """The started transactional producer of `partition`, None if this worker does not own it now."""
        producers: dict[str, AIOKafkaProducer] = self._app.producer._transaction_producers  # type: ignore[attr-defined]
        return producers.get(self.transactional_id(partition))

    async def commit(
        self,
        producer: AIOKafkaProducer,
        deliveries: Iterable[Awaitable[Any]],
        offsets: Mapping[tuple[str, int], int],
    ) -> None:
        """Wait for every record, add the next offsets to read, commit, and open the next transaction."""
        try:
            await asyncio.gather(*deliveries)
            await producer.send_offsets_to_transaction(
                {TopicPartition(topic, part): offset for (topic, part), offset in offsets.items()},
                self._app.conf.id,
            )
            await producer.commit_transaction()
            await producer.begin_transaction()
        except asyncio.CancelledError:
            raise  # stopping mid-batch: the open transaction is aborted by the next owner, no clean marker
        except BaseException as exc:  # every failure here is fatal by design
            fatal(f"transaction failed, exiting so the state is rebuilt from the changelogs: {exc!r}")


def fatal(reason: str) -> NoReturn:
    """Leave now: no shutdown hooks, no clean-stop marker, nothing half-committed survives in local state."""
    log.critical(reason)
    logging.shutdown()
    os._exit(FATAL_EXIT_STATUS)


def wipe_tables_after_unclean_stop(data_dir: Path, tabledir: Path) -> bool:
    """Drop local table state unless the last stop was clean; returns whether it wiped.

    After a crash RocksDB may hold rows of a batch whose transaction never committed; the changelogs hold
    exactly the committed rows, and the worker restores tables from them (`streams/app/restore.py`).
    """
    marker = data_dir / CLEAN_STOP_MARKER
    clean = marker.exists()
    marker.unlink(missing_ok=True)
    if not clean and tabledir.exists():
        shutil.rmtree(tabledir)
        return True
    return False


def mark_clean_stop(data_dir: Path) -> Path:
    """Record that local tables equal the committed changelogs, so the next start can trust them."""
    data_dir.mkdir(parents=True, exist_ok=True)
    marker = data_dir / CLEAN_STOP_MARKER
    marker.touch()
    return marker
