"""Deterministic message-passing simulator for `streams.app.protocol` (docs/stream-protocol.md §13).

Kafka, modelled just enough to break the protocol if it relies on anything Kafka does not promise:
- N partitions; each has a raw input queue (pre-filled) and an internal log (envelopes), consumed in order;
- a batch handles a random number of records of one partition, then *commits*: dirty rows go to the committed
  store, sends become envelopes per destination, queued in a per-(source, destination) transit FIFO;
- a seeded scheduler picks between running a partition and delivering the head of a random transit FIFO, so
  order is kept per (source, destination) pair (one producer per partition, as in Kafka) but messages from
  different sources interleave arbitrarily;
- a *crash* of a batch drops its effects (sends and outputs never committed), rebuilds the partition's rows
  from its committed store (FN §3: wipe, restore from the changelog) and leaves its inputs uncommitted, so
  they are redelivered.

Every envelope goes through `encode_envelopes` / `decode_envelope`, so what crosses partitions is bytes only.
Used by tests/unit/test_protocol_sim.py; import `Sim` for a bench.
"""

from __future__ import annotations

import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from streams.app.protocol import (
    DEFERRED_INFIX,
    FORGOTTEN_WHILE_INDEXING_KEY,
    HOLDERS_PREFIX,
    INDEX_PROGRESS_KEY,
    Effects,
    IdRow,
    MemoryRowStore,
    Msg,
    PartitionState,
    ProfileRow,
    Resolved,
    decode_envelope,
    destination,
    encode_envelopes,
    handle,
    ingest,
)
from streams.core import IdentityChange, ProfileState, Rules
from streams.core.state import ACTIVE, MERGED
from streams.events import NormalizedEvent

__all__ = ["Final", "Sim", "SimStuck"]


class SimStuck(AssertionError):
    """The step budget ran out before quiescence: a deadlock or livelock."""


@dataclass
class Final:
    """The committed end state of every partition, decoded."""

    n: int  # partitions
    ids: dict[str, IdRow] = field(default_factory=dict)
    profiles: dict[str, ProfileRow] = field(default_factory=dict)
    deferred_rows: int = 0  # rows of deferred messages (each profile's are read into its `q`, too)
    # (partition, neighbour code, identifier): its register there holds the code (the erase's index, §7)
    holders: set[tuple[int, int, str]] = field(default_factory=set)
    holders_indexed: set[int] = field(default_factory=set)  # partitions whose index is complete

    def resolve(self, pid: str | None) -> str | None:
        """Follow stubs to the live profile; None for no profile, erased or unknown."""
        seen = 0
        while pid is not None:
            row = self.profiles.get(pid)
            if row is None:
                return None
            st = row.state
            if st.status == ACTIVE:
                return pid
            if st.status != MERGED:
                return None
            pid = st.merged_into
            seen += 1
            assert seen < 10_000, "forwarding cycle"
        return None

    def live(self) -> dict[str, ProfileState]:
        """Live profiles by id."""
        return {pid: r.state for pid, r in self.profiles.items() if r.state.status == ACTIVE}


class Sim:
    """One run of the protocol over `n` partitions with a seeded scheduler and crash injection."""

    def __init__(
        self,
        n: int,
        rules: Rules,
        *,
        seed: int = 0,
        crash_rate: float = 0.0,
        max_batch: int = 8,
        deliver_bias: float = 0.5,
    ) -> None:
        self.n = n
        self.rules = rules
        self.rng = random.Random(seed)
        self.crash_rate = crash_rate
        self.max_batch = max(1, max_batch)
        self.deliver_bias = deliver_bias
        self.committed = [MemoryRowStore() for _ in range(n)]
        self.states = [PartitionState(i, n, rules, MemoryRowStore()) for i in range(n)]
        self.raw: list[deque[NormalizedEvent]] = [deque() for _ in range(n)]
        self.log: list[deque[bytes]] = [deque() for _ in range(n)]
        self.transit: dict[tuple[int, int], deque[bytes]] = {}
        # committed outputs
        self.resolved: list[Resolved] = []
        self.changes: list[IdentityChange] = []
        self.dropped: Counter[str] = Counter()
        self.snapshots = 0
        self.crashes = 0
        self.batches = 0
        self.handled = 0
        self.envelopes = 0
        self.seconds = 0.0

    def feed(self, events: list[NormalizedEvent]) -> None:
        """Put events on raw partitions (random, like a producer keyed by something else), in order."""
        for ev in events:
            self.raw[self.rng.randrange(self.n)].append(ev)

    def inject(self, msg: Msg) -> None:
        """A record on the internal topic that no worker wrote: an operator's request (`omnistitch split`)."""
        self.log[destination(msg, self.n)].extend(encode_envelopes([msg]))

    def _runnable(self) -> list[int]:
        return [i for i in range(self.n) if self.raw[i] or self.log[i]]

    def run(self, max_steps: int = 200_000) -> Final:
        """Schedule until quiescent; SimStuck if `max_steps` scheduler steps were not enough."""
        began = time.perf_counter()
        for _ in range(max_steps):
            if not self.step():
                self.seconds += time.perf_counter() - began
                return self.final()
        raise SimStuck(f"no quiescence after {max_steps} steps")

    def step(self) -> bool:
        """One scheduler step: deliver the head of a transit lane or run a batch; False when quiescent.

        Feeding events between steps, without running to quiescence, keeps work in flight while new events
        arrive, as in the live stream: later events overtake earlier ones on other partitions.
        """
        runnable = self._runnable()
        lanes = [k for k, v in self.transit.items() if v]
        if not runnable and not lanes:
            return False
        if lanes and (not runnable or self.rng.random() < self.deliver_bias):
            src, dest = lanes[self.rng.randrange(len(lanes))]
            self.log[dest].append(self.transit[(src, dest)].popleft())
        else:
            self._batch(runnable[self.rng.randrange(len(runnable))])
        return True

    def _batch(self, i: int) -> None:
        st = self.states[i]
        fx = Effects()
        size = self.rng.randint(1, self.max_batch)
        raw_taken = log_taken = 0
        # records of the two input topics interleave arbitrarily, each in its own order
        for _ in range(size):
            has_raw = raw_taken < len(self.raw[i])
            has_log = log_taken < len(self.log[i])
            if not has_raw and not has_log:
                break
            if has_raw and (not has_log or self.rng.random() < 0.5):
                ingest(st, self.raw[i][raw_taken], fx)
                raw_taken += 1
            else:
                for m in decode_envelope(self.log[i][log_taken]):
                    handle(st, m, fx)
                log_taken += 1
        self.batches += 1
        self.handled += fx.handled
        if self.crash_rate and self.rng.random() < self.crash_rate:
            # kill -9 before the commit: nothing of the batch is visible; rows come back from the changelog
            self.crashes += 1
            self.states[i] = PartitionState(i, self.n, self.rules, self.committed[i].copy())
            return
        # commit: rows, outputs, envelopes and input offsets together
        self.committed[i].write(st.flush())
        for _ in range(raw_taken):
            self.raw[i].popleft()
        for _ in range(log_taken):
            self.log[i].popleft()
        self.resolved.extend(fx.resolved)
        self.changes.extend(fx.changes)
        self.dropped.update(fx.dropped)
        self.snapshots += len(fx.profiles)
        for dest, msgs in fx.sends.items():
            envelopes = encode_envelopes(msgs)
            self.transit.setdefault((i, dest), deque()).extend(envelopes)
            self.envelopes += len(envelopes)

    def final(self) -> Final:
        """Decode every committed row of every partition."""
        out = Final(self.n)
        for partition, store in enumerate(self.committed):
            for key, raw in store.rows["ids"].items():
                if key == INDEX_PROGRESS_KEY:
                    if raw == b"":
                        out.holders_indexed.add(partition)
                elif key == FORGOTTEN_WHILE_INDEXING_KEY:
                    continue
                elif key.startswith(HOLDERS_PREFIX):
                    code, held = key[len(HOLDERS_PREFIX) :].split(b"/", 1)
                    out.holders.add((partition, int(code), held.decode()))
                else:
                    out.ids[key.decode()] = IdRow.decode(raw)
            rows = store.rows["profiles"]
            for key, raw in rows.items():
                if DEFERRED_INFIX in key:
                    out.deferred_rows += 1
                else:
                    out.profiles[key.decode()] = ProfileRow.decode(raw, rows.get)
        return out
