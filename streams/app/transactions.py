"""Exactly-once on faust-streaming 0.15.3, done by us: one Kafka transaction per input partition and batch.

faust's own exactly-once is broken in ways docs/faust-notes.md reproduces: records go into the transaction of
their *destination* partition (or none), its timer commits acked offsets in the middle of a batch, commit
errors are logged and swallowed, and local RocksDB keeps writes of aborted transactions. We keep what works
(group membership, co-partitioned assignment, one transactional producer per partition started and fenced
on every rebalance, table recovery from changelogs read `read_committed`) and take over the rest:

1. faust's offset commit is disabled: offsets are committed *only* by `PartitionTransactions.commit`, in the
   same transaction as every record the batch produced (outputs, envelopes, DLQ, table changelogs);
2. a batch holds `lock` from its first read to its commit, and faust's rebalance steps that stop and start
   transactional producers wait for it, so producers never change under a batch;
3. any transaction error is fatal: the process exits at once, without marking a clean stop, so the next
   start rebuilds local tables from the committed changelogs (`wipe_tables_after_unclean_stop`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import faust
from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition

__all__ = ["CLEAN_STOP_MARKER", "PartitionTransactions", "mark_clean_stop", "wipe_tables_after_unclean_stop"]

log = logging.getLogger(__name__)

CLEAN_STOP_MARKER = "clean-stop"
# Exit status of a worker that stopped on a transaction error (EX_SOFTWARE): restart it, state is rebuilt.
FATAL_EXIT_STATUS = 70


class PartitionTransactions:
    """Commits a batch's records and input offsets of one partition atomically, with faust's producers."""

    def __init__(self, app: faust.App, input_topic: str, on_rebalance: Callable[[], None]) -> None:
        self._app = app
        self._input_topic = input_topic
        self._on_rebalance = on_rebalance
        self.lock = asyncio.Lock()
        # True while local tables hold writes no transaction has committed yet (a stop then is unclean)
        self._dirty = False
        self._marker: Path | None = None
        self._installed_on: object | None = None

    def begin_batch(self) -> None:
        """Local rows are about to change ahead of their commit: a stop from here on is unclean."""
        self._dirty = True
        if self._marker is not None:
            self._marker.unlink(missing_ok=True)
            self._marker = None

    def end_batch(self) -> None:
        """Every row written so far is committed."""
        self._dirty = False

    def stopped_cleanly(self, data_dir: Path) -> None:
        """Mark a clean stop unless a batch is half done (then the next start rebuilds the tables)."""
        if not self._dirty:
            self._marker = mark_clean_stop(data_dir)

    def install(self) -> None:
        """Disable faust's commits and fence its rebalance steps off from batches (idempotent)."""
        consumer = self._app.consumer
        if self._installed_on is consumer:
            return
        self._installed_on = consumer

        async def commit_nothing(*args: Any, **kwargs: Any) -> bool:
            return False  # offsets are committed inside our transactions only

        consumer.commit = commit_nothing  # type: ignore[method-assign]
        transactions: Any = consumer.transactions
        transactions.on_partitions_revoked = self._guarded(transactions.on_partitions_revoked)
        transactions.on_rebalance = self._guarded(transactions.on_rebalance)

    def _guarded(self, step: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            async with self.lock:
                self._on_rebalance()  # caches of partitions that may move must go
                return await step(*args, **kwargs)

        return guarded

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
        except BaseException as exc:  # every failure here is fatal by design
            fatal(f"transaction failed, exiting so the state is rebuilt from the changelogs: {exc!r}")


def fatal(reason: str) -> None:
    """Leave now: no shutdown hooks, no clean-stop marker, nothing half-committed survives in local state."""
    log.critical(reason)
    logging.shutdown()
    os._exit(FATAL_EXIT_STATUS)


def wipe_tables_after_unclean_stop(data_dir: Path, tabledir: Path) -> bool:
    """Drop local table state unless the last stop was clean; returns whether it wiped.

    After a crash RocksDB may hold rows of a batch whose transaction never committed; the changelogs hold
    exactly the committed rows, and faust restores tables from them when the partitions are assigned.
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
