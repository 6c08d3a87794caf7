"""Worker metrics that need no broker."""

from __future__ import annotations

import gc

from streams import metrics
from streams.app.worker import GC_PAUSES, observe_gc_pauses


def test_each_cyclic_collection_is_timed_once_by_generation() -> None:
    observe_gc_pauses()
    observe_gc_pauses()  # a second app in the same process must not time collections twice
    try:
        assert gc.callbacks.count(GC_PAUSES) == 1
        labels = {"generation": "2"}
        before = metrics.REGISTRY.get_sample_value("omnistitch_gc_pause_seconds_count", labels) or 0.0
        seconds = metrics.REGISTRY.get_sample_value("omnistitch_gc_pause_seconds_sum", labels) or 0.0
        gc.collect()
        assert metrics.REGISTRY.get_sample_value("omnistitch_gc_pause_seconds_count", labels) == before + 1
        assert (metrics.REGISTRY.get_sample_value("omnistitch_gc_pause_seconds_sum", labels) or 0.0) > seconds
    finally:
        gc.callbacks.remove(GC_PAUSES)
