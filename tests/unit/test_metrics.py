"""Worker metrics that need no broker."""

from __future__ import annotations

import gc
import threading
from typing import Any

from streams import metrics


def test_each_cyclic_collection_is_timed_once_by_generation() -> None:
    metrics.observe_gc_pauses()
    metrics.observe_gc_pauses()  # a second app in the same process must not time collections twice
    try:
        assert gc.callbacks.count(metrics.GC_PAUSES) == 1
        labels = {"generation": "2"}
        before = metrics.REGISTRY.get_sample_value("omnistitch_gc_pause_seconds_count", labels) or 0.0
        seconds = metrics.REGISTRY.get_sample_value("omnistitch_gc_pause_seconds_sum", labels) or 0.0
        gc.collect()
        assert metrics.REGISTRY.get_sample_value("omnistitch_gc_pause_seconds_count", labels) == before + 1
        assert (metrics.REGISTRY.get_sample_value("omnistitch_gc_pause_seconds_sum", labels) or 0.0) > seconds
        inf = {"generation": "2", "le": "+Inf"}
        assert metrics.REGISTRY.get_sample_value("omnistitch_gc_pause_seconds_bucket", inf) == before + 1
    finally:
        gc.callbacks.remove(metrics.GC_PAUSES)


def _metric_locks() -> set[Any]:
    """Every lock of every metric in the registry: the metrics', their children's and their values'."""
    locks: set[Any] = set()
    for collector in list(metrics.REGISTRY._collector_to_names):
        for obj in [collector, *getattr(collector, "_metrics", {}).values()]:
            for holder in (obj, getattr(obj, "_value", None), getattr(obj, "_sum", None)):
                lock = getattr(holder, "_lock", None)
                if lock is not None:
                    locks.add(lock)
    return locks


def test_timing_a_collection_takes_no_metric_lock() -> None:
    """The collector can start inside any allocation, also one made while a metric holds its lock (they are
    not reentrant): a callback waiting for a lock its own thread holds would stop the worker for good."""
    metrics.observe_gc_pauses()
    locks = _metric_locks()
    for lock in locks:
        lock.acquire()
    collecting = threading.Thread(target=gc.collect)
    try:
        collecting.start()
        collecting.join(5)
        blocked = collecting.is_alive()
    finally:
        for lock in locks:
            lock.release()
        collecting.join()
        gc.callbacks.remove(metrics.GC_PAUSES)
    assert locks and not blocked


def test_every_metric_the_worker_exposes_is_in_the_readme() -> None:
    """SREs build dashboards and alerts from the README's Metrics section: nothing exposed may be missing."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    names = {family.name for family in metrics.REGISTRY.collect()}
    assert names and not {n for n in names if n not in section}
