"""Every Prometheus metric of a worker, in one registry: SREs find names, units and labels here.

Labels are bounded sets only (source, event type, DLQ code, rule name); never an identifier or a profile id.
"""

from __future__ import annotations

import bisect
import gc
import itertools
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "BATCH_RECORDS",
    "BATCH_SECONDS",
    "DLQ_TOTAL",
    "EVENTS_IN_TOTAL",
    "EVENTS_RESOLVED_TOTAL",
    "EVENT_LAG_SECONDS",
    "GC_PAUSES",
    "HELD_TOTAL",
    "HOLDERS_INDEX_COMPLETE",
    "IDENTIFIERS_DROPPED_TOTAL",
    "MERGES_REFUSED_TOTAL",
    "MERGES_TOTAL",
    "PROTOCOL_DROPPED_TOTAL",
    "RECORD_WAIT_SECONDS",
    "REDELIVERED_TOTAL",
    "REGISTRY",
    "RESTORE_SECONDS",
    "TABLE_MEMORY_BYTES",
    "TABLE_MEMORY_LIMIT_BYTES",
    "observe_gc_pauses",
]

REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS_IN_TOTAL = Counter(
    "omnistitch_events_in_total",
    "Valid raw events read, by source and type.",
    ["source", "type"],
    registry=REGISTRY,
)
DLQ_TOTAL = Counter(
    "omnistitch_dlq_total",
    "Messages sent to the dead-letter topic, by stage and code.",
    ["stage", "code"],
    registry=REGISTRY,
)
IDENTIFIERS_DROPPED_TOTAL = Counter(
    "omnistitch_identifiers_dropped_total",
    "Identifiers removed by normalisation, by type and reason.",
    ["type", "reason"],
    registry=REGISTRY,
)
EVENTS_RESOLVED_TOTAL = Counter(
    "omnistitch_events_resolved_total",
    "Events written to events.resolved with their profile.",
    registry=REGISTRY,
)
MERGES_TOTAL = Counter("omnistitch_merges_total", "Profiles merged into a survivor.", registry=REGISTRY)
MERGES_REFUSED_TOTAL = Counter(
    "omnistitch_merges_refused_total",
    "Links refused by merge protection, by rule.",
    ["rule"],
    registry=REGISTRY,
)
PROTOCOL_DROPPED_TOTAL = Counter(
    "omnistitch_protocol_dropped_total",
    "Protocol messages dropped on purpose (e.g. for an erased profile), by reason.",
    ["reason"],
    registry=REGISTRY,
)
REDELIVERED_TOTAL = Counter(
    "omnistitch_redelivered_total",
    "Input records skipped as already processed, or fetched before the latest rebalance (read again after).",
    registry=REGISTRY,
)
HELD_TOTAL = Counter(
    "omnistitch_held_total",
    "Input records held back because records before them may have been lost between fetch and batch; "
    "the partition is read again from its position.",
    registry=REGISTRY,
)
# One partition's share of a batch: from a trickle to the whole batch (OMNISTITCH_BATCH_MAX_RECORDS).
BATCH_RECORDS = Histogram(
    "omnistitch_batch_records",
    "Input records (raw events and protocol envelopes) per partition transaction.",
    buckets=(1, 5, 20, 50, 100, 250, 500, 1000, 2000, 5000),
    registry=REGISTRY,
)
# Where a batch's time goes: `handle` (validation, protocol, building records) is CPU; `commit` (deliveries,
# offsets, commit) is broker round trips. Buckets around the ~50 ms a hop may cost at the p99 target.
BATCH_SECONDS = Histogram(
    "omnistitch_batch_seconds",
    "Seconds per batch (all partitions of one take), by stage.",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
# How long input records waited between being produced (their Kafka timestamp) and being handled: for raw
# records, a producer's send to the first step; for internal ones, one partition hop. Event-time lag cannot
# show this: it also counts how late producers send (a backfill's events are hours old on arrival).
RECORD_WAIT_SECONDS = Histogram(
    "omnistitch_record_wait_seconds",
    "Seconds from an input record's Kafka timestamp to its handling, by input (raw or internal).",
    ["input"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
# Event time → resolved: buckets span the 250 ms p99 target at 5k events/s up to a backlog of minutes.
EVENT_LAG_SECONDS = Histogram(
    "omnistitch_event_lag_seconds",
    "End-to-end lag from the event's occurred_at to its resolution.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
    registry=REGISTRY,
)


class _GcPauses(Collector):
    """`omnistitch_gc_pause_seconds{generation}`: CPython's cyclic collector stops the worker while it scans,
    and every event in flight waits (an older generation over the cached rows can take hundreds of ms).

    A `gc.callbacks` entry. It may run inside any allocation, even one made while a metric holds its
    (non-reentrant) lock, so it only adds to plain lists; the histogram is built from them at scrape time.
    """

    BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

    def __init__(self) -> None:
        self._started = 0.0
        # per generation: a count per bucket, the last one above every bound (+Inf)
        self._counts = [[0] * (len(self.BUCKETS) + 1) for _ in range(3)]
        self._sums = [0.0, 0.0, 0.0]

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._started
        generation = info["generation"]
        self._sums[generation] += seconds
        self._counts[generation][bisect.bisect_left(self.BUCKETS, seconds)] += 1

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "omnistitch_gc_pause_seconds",
            "Seconds the worker stood still in CPython's cyclic garbage collector, by generation collected.",
            labels=["generation"],
        )
        for generation, counts in enumerate(self._counts):
            cumulative = list(itertools.accumulate(counts))
            buckets = [(str(le), float(n)) for le, n in zip(self.BUCKETS, cumulative, strict=False)]
            buckets.append(("+Inf", float(cumulative[-1])))
            family.add_metric([str(generation)], buckets, sum_value=self._sums[generation])
        yield family


GC_PAUSES = _GcPauses()
REGISTRY.register(GC_PAUSES)


def observe_gc_pauses() -> None:
    """Time every cyclic collection into `omnistitch_gc_pause_seconds`, once per process."""
    if GC_PAUSES not in gc.callbacks:
        gc.callbacks.append(GC_PAUSES)


RESTORE_SECONDS = Histogram(
    "omnistitch_restore_seconds",
    "Seconds to bring the tables of a new assignment up to their changelogs' ends, before its first batch.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)

TABLE_MEMORY_BYTES = Gauge(
    "omnistitch_table_memory_bytes",
    "RocksDB memory of the worker's table databases: their shared block cache, memtables included.",
    registry=REGISTRY,
)
TABLE_MEMORY_LIMIT_BYTES = Gauge(
    "omnistitch_table_memory_limit_bytes",
    "The budget of omnistitch_table_memory_bytes (OMNISTITCH_TABLE_MEMORY_MB); RocksDB may pass it briefly.",
    registry=REGISTRY,
)
HOLDERS_INDEX_COMPLETE = Gauge(
    "omnistitch_holders_index_complete",
    "1 once every register of the partition is in the holders index, 0 while those written by 0.4.1 and older"
    " are indexed, a step per batch (set at each batch by the partition's owner).",
    ["partition"],
    registry=REGISTRY,
)
