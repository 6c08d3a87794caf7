"""Whole fetches of the input topics go to the stitcher at once; faust's per-record delivery cost too much.

faust's fetch loop hands every record to its conductor on its own: a `Message` object, two tasks in
`wait_first`, a lock, a queue, an `Event`, a stream iteration with sensors and acks. In a profile of the
worker that was a quarter of its CPU, more than validating the events (docs/faust-notes.md §10). For the
input topics we keep faust's fetch (`_wait_next_records`: flow control, partitions paused during recovery
and rebalances, all as before), then pass the fetch's input records to an `Inbox` in one call. Records of
other topics (the changelogs of standby replicas) still take faust's per-record path, with its read-offset
filter, up to the next rebalance. Whether the input records a batch takes are contiguous is proven by
`transactions.InputPositions`, whatever the fetch delivers.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import operator
import time
from collections import defaultdict
from collections.abc import Callable, Collection
from typing import Any, TypeAlias, cast

from aiokafka.structs import ConsumerRecord
from faust.types import ConsumerT

__all__ = ["Inbox", "in_time_order", "install_bulk_fetch"]

# Seconds one fetch waits for records when there are none (faust's own value).
FETCH_TIMEOUT = 1.0
# How often a fetch waiting for room in the inbox checks whether a rebalance lets it overflow.
OVERFLOW_CHECK_SECONDS = 0.1

Record: TypeAlias = ConsumerRecord[bytes, bytes]


class Inbox:
    """Fetched input records not yet stitched, in fetch order; the fetch waits while `limit` are waiting.

    The stitcher takes everything that arrived while its previous batch ran, so batches grow with the load
    (fewer transactions per event). Under light load a batch still waits until its oldest record is `linger`
    seconds old: every batch costs a transaction per partition, in the worker and in the broker.

    The fetch must not wait while `may_overflow()` holds: during a rebalance the stitcher takes nothing, and
    faust's rebalance steps (and standby replicas) need the same fetch loop to keep polling. Faust pauses the
    input partitions meanwhile, so at most the fetches already in flight pile up.

    Records carry the consumer generation current when their fetch returned. Records of an older generation
    are dropped as soon as newer ones arrive: after a rebalance every assigned partition is read again from
    its committed offset.
    """

    def __init__(self, limit: int, may_overflow: Callable[[], bool]) -> None:
        self._limit = limit
        self._may_overflow = may_overflow
        self._records: list[Record] = []
        self._generation = -1  # consumer generation the records were fetched in
        self._oldest_since = 0.0  # monotonic time the oldest waiting record arrived (or earlier)
        self._arrived = asyncio.Event()
        self._taken = asyncio.Event()

    def __len__(self) -> int:
        return len(self._records)

    async def put(self, records: list[Record], generation: int) -> None:
        """Add one fetch's records; `generation`: the consumer generation when the fetch returned."""
        if generation < self._generation:
            return
        if generation > self._generation:
            self._records, self._generation = [], generation
        while len(self._records) >= self._limit and not self._may_overflow():
            self._taken.clear()
            with contextlib.suppress(TimeoutError):  # look at `may_overflow` again now and then
                await asyncio.wait_for(self._taken.wait(), OVERFLOW_CHECK_SECONDS)
        if not self._records:
            self._oldest_since = time.monotonic()
        self._records.extend(records)
        self._arrived.set()

    async def take(self, most: int, linger: float) -> tuple[list[Record], int]:
        """The oldest `most` records once the oldest has waited `linger` seconds or `most` are waiting, and
        their consumer generation."""
        while not self._records:
            self._arrived.clear()
            await self._arrived.wait()
        wait = self._oldest_since + linger - time.monotonic()
        if wait > 0 and len(self._records) < most:
            await asyncio.sleep(wait)
        taken, self._records = self._records[:most], self._records[most:]
        self._oldest_since = float("-inf")  # any records left have waited at least as long: not again
        self._taken.set()
        return taken, self._generation


_record_time = operator.attrgetter("timestamp")


def in_time_order(by_input: dict[tuple[str, int], list[Record]]) -> dict[int, list[Record]]:
    """Each partition number's records, the inputs merged by record timestamp, each input's order kept.

    A fetch holds long runs of one topic partition; handled run after run, one source's events of the last
    second would all be stitched before another's, and order-dependent decisions (merge protection) would
    drift further from event-time order than they need to. Kafka orders records within a topic partition only,
    so any interleaving across topics is as correct; this one is the closest to the time the events happened.
    """
    inputs: dict[int, list[list[Record]]] = defaultdict(list)
    for (_, partition), records in by_input.items():
        inputs[partition].append(records)
    return {
        partition: lists[0] if len(lists) == 1 else list(heapq.merge(*lists, key=_record_time))
        for partition, lists in inputs.items()
    }


def install_bulk_fetch(consumer: ConsumerT, inputs: Collection[str], inbox: Inbox) -> None:
    """Replace `consumer`'s fetch loop by one that delivers `inputs` records to `inbox` a fetch at a time.

    Must run before faust starts fetching: `_new_consumer` of the worker's app calls it.
    """
    faust_consumer = cast(Any, consumer)
    app = faust_consumer.app
    input_topics = frozenset(inputs)

    async def drain_messages(fetcher: Any) -> None:
        callback = faust_consumer.callback
        to_message = faust_consumer._to_message
        read_offset = faust_consumer._read_offset
        buffered = faust_consumer._buffered_partitions
        consumer_stopped = faust_consumer._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set
        while not (consumer_stopped() or fetcher_stopped()):
            records, active = await faust_consumer._wait_next_records(FETCH_TIMEOUT)
            # read after the wait, as faust's `getmany` does: the wait spans whole rebalances, and a fetch
            # dropped for its generation would drop the table changelog records recovery is waiting for
            generation = app.consumer_generation_id
            if not records or faust_consumer.should_stop or not faust_consumer.flow_active:
                continue
            fetched: list[Record] = []
            for tp, tp_records in records.items():
                if active is not None and tp not in active and tp not in buffered:
                    continue
                if tp.topic in input_topics:
                    fetched.extend(tp_records)
                    continue
                # faust's filter for the tables' changelogs: nothing below the offset a seek went back to
                floor = read_offset[tp]
                if floor is not None:
                    tp_records = [record for record in tp_records if record.offset >= floor]
                if not tp_records:
                    continue
                read_offset[tp] = tp_records[-1].offset
                for record in tp_records:
                    if app.consumer_generation_id != generation:
                        # a rebalance came while these waited: their partition may be gone, or being
                        # restored again from another offset (faust-notes §12); recovery seeks what it needs
                        break
                    await faust_consumer.wait_first(
                        callback(to_message(tp, record)), faust_consumer.suspend_flow.wait()
                    )
            if fetched:
                await inbox.put(fetched, generation)

    faust_consumer._drain_messages = drain_messages
