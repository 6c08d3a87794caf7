"""From fetch to batch: the inbox (order, size, linger, generations, back-pressure), the merge by time, and
the changelog records the fetch loop passes to table recovery."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any, cast

from aiokafka.structs import ConsumerRecord
from faust.types import TP

from streams.app.fetch import Inbox, Record, in_time_order, install_bulk_fetch


def _records(topic: str, partition: int, offsets: range) -> list[Record]:
    return [ConsumerRecord(topic, partition, offset, 0, 0, None, b"v", None, 0, 1, ()) for offset in offsets]


def test_a_batch_is_what_waits_in_fetch_order_up_to_the_most_asked() -> None:
    async def run() -> None:
        inbox = Inbox(limit=100, may_overflow=lambda: False)
        await inbox.put(_records("raw.web", 0, range(3)), generation=1)
        await inbox.put(_records("raw.app", 1, range(5)), generation=1)
        taken, generation = await inbox.take(most=6, linger=0)
        expected = [("raw.web", offset) for offset in range(3)] + [("raw.app", offset) for offset in range(3)]
        assert [(r.topic, r.offset) for r in taken] == expected
        assert generation == 1
        rest, _ = await inbox.take(most=6, linger=10)  # has waited already: no second linger
        assert [r.offset for r in rest] == [3, 4]

    asyncio.run(asyncio.wait_for(run(), 5))


def test_a_small_batch_lingers_until_its_oldest_record_has_waited() -> None:
    async def run() -> float:
        inbox = Inbox(limit=100, may_overflow=lambda: False)
        await inbox.put(_records("raw.web", 0, range(2)), generation=1)
        began = time.monotonic()
        taken, _ = await inbox.take(most=1000, linger=0.2)
        assert len(taken) == 2
        return time.monotonic() - began

    assert asyncio.run(asyncio.wait_for(run(), 5)) >= 0.15


def test_records_of_an_older_generation_never_reach_a_batch() -> None:
    async def run() -> None:
        inbox = Inbox(limit=100, may_overflow=lambda: False)
        await inbox.put(_records("raw.web", 0, range(10, 13)), generation=4)
        await inbox.put(_records("raw.web", 0, range(5, 7)), generation=5)  # read again after a rebalance
        await inbox.put(_records("raw.web", 0, range(13, 15)), generation=4)  # a fetch that returned late
        taken, generation = await inbox.take(most=100, linger=0)
        assert [r.offset for r in taken] == [5, 6] and generation == 5

    asyncio.run(asyncio.wait_for(run(), 5))


def test_a_full_inbox_holds_the_fetch_unless_it_may_overflow() -> None:
    async def run() -> None:
        overflow = False
        inbox = Inbox(limit=3, may_overflow=lambda: overflow)
        await inbox.put(_records("raw.web", 0, range(3)), generation=1)
        blocked = asyncio.create_task(inbox.put(_records("raw.web", 0, range(3, 5)), generation=1))
        await asyncio.sleep(0.3)
        assert not blocked.done() and len(inbox) == 3
        await inbox.take(most=2, linger=0)  # room again: the fetch goes on
        await asyncio.wait_for(blocked, 1)
        assert len(inbox) == 3
        blocked = asyncio.create_task(inbox.put(_records("raw.web", 0, range(5, 7)), generation=1))
        await asyncio.sleep(0.3)
        assert not blocked.done()
        overflow = True  # a rebalance: the stitcher takes nothing, and recovery needs the fetch loop
        await asyncio.wait_for(blocked, 1)
        assert len(inbox) == 5

    asyncio.run(asyncio.wait_for(run(), 5))


def test_a_partitions_inputs_are_merged_by_timestamp_each_keeping_its_order() -> None:
    def at(topic: str, partition: int, offset: int, timestamp: int) -> Record:
        return ConsumerRecord(topic, partition, offset, timestamp, 0, None, b"v", None, 0, 1, ())

    web = [at("raw.web", 0, 10, 100), at("raw.web", 0, 11, 300), at("raw.web", 0, 12, 250)]  # clock skew
    app = [at("raw.app", 0, 7, 200), at("raw.app", 0, 8, 400)]
    other = [at("raw.app", 1, 3, 50)]
    merged = in_time_order({("raw.web", 0): web, ("raw.app", 0): app, ("raw.app", 1): other})
    assert [(r.topic, r.offset) for r in merged[0]] == [
        ("raw.web", 10),
        ("raw.app", 7),
        ("raw.web", 11),
        ("raw.web", 12),  # never ahead of 11, whatever its timestamp
        ("raw.app", 8),
    ]
    assert merged[1] == other


class _FakeConsumer:
    """The parts of faust's consumer the bulk fetch loop uses; one fetch of changelog records, then stop."""

    def __init__(self, tp: TP, records: list[Record]) -> None:
        self.app = SimpleNamespace(consumer_generation_id=5)
        self._fetches = [({tp: records}, None)]
        self._read_offset: dict[TP, int | None] = {tp: None}
        self._buffered_partitions: set[TP] = set()
        self._stopped = asyncio.Event()
        self.suspend_flow = asyncio.Event()
        self.should_stop = False
        self.flow_active = True
        self.delivered: list[int] = []

    async def _wait_next_records(self, timeout: float) -> tuple[dict[TP, list[Record]], None]:
        if not self._fetches:
            self._stopped.set()
            return {}, None
        return self._fetches.pop(0)

    def _to_message(self, tp: TP, record: Record) -> Record:
        return record

    async def callback(self, record: Record) -> None:
        self.delivered.append(record.offset)
        if record.offset == 101:
            self.app.consumer_generation_id = 6  # a rebalance while the rest of the fetch waits

    async def wait_first(self, *coros: Any) -> None:
        await coros[0]
        coros[1].close()


def test_changelog_records_fetched_before_a_rebalance_are_not_delivered_after_it() -> None:
    tp = TP("app-profiles-changelog", 0)
    consumer = _FakeConsumer(tp, _records(tp.topic, tp.partition, range(100, 105)))
    install_bulk_fetch(cast(Any, consumer), ["raw.web"], Inbox(limit=100, may_overflow=lambda: True))
    fetcher = SimpleNamespace(_stopped=asyncio.Event())

    asyncio.run(asyncio.wait_for(cast(Any, consumer)._drain_messages(fetcher), 5))
    # 102-104 could land in a restore that began elsewhere, after a gap (docs/faust-notes.md §12)
    assert consumer.delivered == [100, 101]
