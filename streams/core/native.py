"""`IdentityGraph.link` in Rust (the optional `omnistitch_native` module), over the same store bytes.

The native engine is a port of the link path only: `graph.py` stays the reference and keeps everything
else (erase events, split, erase, explain, lookups). Both read and write the same keys and values, so they
take turns on one state: an erase event is linked by a Python graph over the flushed store, and `python()`
lends one for queries and operator actions. `tests/unit/test_native.py` holds the two to identical results
and identical stored keys and values. Built by `make setup` where cargo >= 1.85 is installed
(native/README.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from streams.core.graph import ChangeKind, IdentityChange, IdentityGraph, LinkResult
from streams.core.rules import Rules
from streams.core.store import MemoryStore, Store
from streams.events import NormalizedEvent

try:
    from omnistitch_native import Engine
except ImportError:  # not built: no Rust toolchain where it was installed
    Engine = None  # type: ignore[assignment,misc]

__all__ = ["NativeGraph", "native_available"]


def _link_in_python(python_graph: Callable[[], IdentityGraph], ev: NormalizedEvent) -> LinkResult:
    """An erase event: linked by a Python graph over the flushed store (the engine re-reads it after)."""
    graph = python_graph()
    result = graph.link(ev)
    graph.flush()
    return result


def native_available() -> bool:
    """Whether the compiled engine imports (`make setup` builds it where cargo >= 1.85 is on PATH)."""
    return Engine is not None


class NativeGraph:
    """`IdentityGraph`'s link path in Rust: same results, same stored keys and values, less time.

    The caches have the Python graph's shape: `cache_profiles` decoded profiles (Rust structs, about twice
    that many, rotated at an event's start rather than at a flush: a dirty one leaving them before the flush
    is encoded then and waits as its row), below them `cold_profiles` packed ones (symbols, deltas and
    strings, about 160 bytes, decoded in well under a microsecond), `cache_identifiers` owners (a record of
    about 38 bytes each); both in arenas of 256 KiB chunks kept within a third above their live records
    (native/README.md, "Memory"); `cache_sizes()` reports them. A decoded profile costs about 1.5 KB, so
    the hot cache defaults to 5,000 (the Python graph: 100,000); each event of a write batch costs about 3 KB
    on its way into RocksDB (the batch's rows as Python bytes, the `WriteBatch`, the memtable):
    `flush_every=5_000` takes 44-57 MB less than the default 20,000 and links 10-18 % slower (BENCHMARKS.md,
    0.4.1). No `on_event` hook.

    `link(ev)` returns what `IdentityGraph.link` returns, for events as validation makes them: `verified` a
    bool and `occurred_at_ms` within 64 signed bits (anything else raises before the event changes any
    state). It flushes at other moments than the Python graph (before an erase event, when lending a graph),
    so the store between flushes differs; every flush still ends at an event boundary.
    """

    def __init__(
        self,
        store: Store | None = None,
        rules: Rules | None = None,
        *,
        cache_profiles: int = 5_000,
        cold_profiles: int = 1_000_000,
        cache_identifiers: int = 1_000_000,
        flush_every: int = 20_000,
        history: bool = True,
    ) -> None:
        if Engine is None:
            raise RuntimeError(
                "the native engine is not built (omnistitch_native): run `make setup` with cargo"
            )
        self.store: Store = store if store is not None else MemoryStore()
        self.cache_profiles = max(cache_profiles, 1)
        self.cold_profiles = max(cold_profiles, 0)
        self.cache_identifiers = max(cache_identifiers, 1)
        self.flush_every = max(flush_every, 1)
        self.rules = rules if rules is not None else Rules()
        # a Python graph over the same store: for erase events and `python()`; a partial, not a bound method,
        # so the engine holding it makes no cycle through this object (which the collector cannot see). Its
        # hot cache is the engine's size: the replay's final step reads every profile through it, and with
        # the Python default (100,000 profiles as Python objects) that step took 120 MB more than the linking
        self._python_graph = functools.partial(
            IdentityGraph, self.store, self.rules, history=history, cache_profiles=self.cache_profiles
        )
        self._engine = Engine(
            self.store,
            self.rules,
            LinkResult,
            IdentityChange,
            (ChangeKind.CREATED, ChangeKind.ATTACHED, ChangeKind.MERGED, ChangeKind.REFUSED),
            functools.partial(_link_in_python, self._python_graph),
            self.cache_profiles,
            self.cold_profiles,
            self.cache_identifiers,
            self.flush_every,
            history,
        )
        # the engine's own method: no Python frame per event
        self.link: Callable[[NormalizedEvent], LinkResult] = self._engine.link

    def link_many(self, events: Iterable[NormalizedEvent]) -> Iterator[LinkResult]:
        """Link events in order, flushing at the end."""
        link = self._engine.link
        for ev in events:
            yield link(ev)
        self.flush()

    @property
    def stats(self) -> dict[str, Any]:
        """The counters `IdentityGraph.stats` would hold after the same input (a copy)."""
        stats: dict[str, Any] = self._engine.stats()
        return stats

    def cache_sizes(self) -> dict[str, int]:
        """Entries and entry bytes in the engine's caches (decoded and packed profiles, owners, symbols), the
        bytes of the chunks holding the packed profiles and owners, and the chunks compacted so far."""
        sizes: dict[str, int] = self._engine.cache_sizes()
        return sizes

    def python(self) -> IdentityGraph:
        """A Python graph over the same store, for lookups, explain, split and erase.

        Its buffered changes are flushed, and the store re-read, before the next native link. It is valid
        only until then: it does not see what later links change (call `python()` again after linking).
        """
        graph: IdentityGraph = self._engine.lend(self._python_graph)
        return graph

    def flush(self) -> None:
        """Write every buffered change to the store."""
        self._engine.flush()

    def compact(self) -> None:
        """Flush, then have the store rewrite its files."""
        self.flush()
        self.store.compact()

    def close(self) -> None:
        """Flush and close the store."""
        self.flush()
        self.store.close()
