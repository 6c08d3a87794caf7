"""The single-process identity graph: drives the pure rules over a store, with a hot cache and write-back.

Item shapes:
    NormalizedEvent ─link─▶ LinkResult(profile_id | None, changes: tuple[IdentityChange, ...], anchor)

Store layout (all keys bytes, values orjson unless said):
    i:<type:value>          → live profile id (ascii)
    p:<profile id>          → ProfileState (tombstone when merged / erased)
    g:<type:value>          → b"1" (value marked generic) or b"s" (weak value marked shared: a family tablet)
    h:<profile id>:<seq>    → one IdentityChange of that profile (the history `explain` reads)
    n:<neighbour code, 12 hex>:<type:value>
                            → b"": that identifier's record holds the code (erasing the coded value drops it)
    r:<type:value>:<profile id>:<seq>
                            → key of a refusal naming this identifier, pinned on the event's profile (often
                              not the identifier's own): `explain` lists it, erasing the identifier drops it
    s:<profile id>          → [profiles it or, once it is erased, a profile it had absorbed was split off]
                              (kept after erases: profile ids are opaque, and erasing an identifier walks
                              these to the histories that name it)
    m:stats                 → counters
    m:old-splits-recorded   → b"1": the `s:` rows of splits made before 0.4.4 were read from the histories
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Concatenate, NamedTuple, ParamSpec, TypeVar

import orjson

from streams.core.ids import derive_profile_id_where, derive_split_id
from streams.core.rules import RULE_GENERIC, RULE_SHARED, Refusal, Rules, check_attach, check_merge
from streams.core.state import (
    ACTIVE,
    ERASED,
    MERGED,
    R_LAST,
    R_NB,
    R_ORIGIN,
    R_VERIFIED,
    R_VIA,
    IdentRecord,
    ProfileState,
    count_people,
    is_people_code,
    neighbour_code,
    people_code,
)
from streams.core.store import MemoryStore, Store
from streams.events import Identifier, NormalizedEvent
from streams.exceptions import UnknownProfileOrIdentifier

__all__ = ["ChangeKind", "IdentityChange", "IdentityGraph", "LinkResult"]

ERASE_TYPE = "erase"


class ChangeKind(StrEnum):
    """What happened to a profile; the stream app maps each to an identity-change contract model."""

    CREATED = "profile_created"
    ATTACHED = "identifiers_attached"
    MERGED = "profiles_merged"
    REFUSED = "merge_refused"
    SPLIT = "profile_split"
    ERASED = "profile_erased"


@dataclass(frozen=True, slots=True)
class IdentityChange:
    """One identity change; `seq` counts changes per profile (1, 2, …) so consumers can order and dedupe."""

    kind: ChangeKind
    profile_id: str
    seq: int
    event_id: str | None
    at_ms: int
    payload: Mapping[str, Any]


class LinkResult(NamedTuple):
    """Result of linking one event: its profile (None if nothing usable), changes, anchoring identifier."""

    profile_id: str | None
    changes: tuple[IdentityChange, ...]
    anchor: str | None = None


_NO_CHANGES: tuple[IdentityChange, ...] = ()
_NOTHING = LinkResult(None, _NO_CHANGES, None)
_STATS_KEY = b"m:stats"
# present once every neighbour code records hold is in the `n:` index (states from before 0.3.4 lack both)
_NEIGHBOUR_INDEX_KEY = b"m:neighbour-index"
_SPLIT_PREFIX = b"s:"
# written once `_record_old_splits` has read a state's histories (it may find no edge left to record)
_OLD_SPLITS_RECORDED_KEY = b"m:old-splits-recorded"
_SHARED_MARK = b"s"


def _seen_with(code: int, key: str) -> bytes:
    """`n:` index key: the record of `key` holds neighbour `code` (found again when that value is erased)."""
    return f"n:{code:012x}:{key}".encode()


def _nb_code(ident: Identifier) -> int:
    return neighbour_code(ident.key)


def _corroborated(side_a: list[Identifier], side_b: list[Identifier], prior: dict[str, list[int]]) -> bool:
    """Whether a value on one side had already been seen with a strong value of the other (earlier event)."""
    if not prior:
        return False
    for xs, ys in ((side_a, side_b), (side_b, side_a)):
        for x in xs:
            nb = prior.get(x.key)
            if nb and any(_nb_code(y) in nb for y in ys):
                return True
    return False


class _Pending:
    """A deferred refusal, emitted at the end of `link` against the event's final profile."""

    __slots__ = ("detail", "identifiers", "other", "rule")

    def __init__(self, refusal: Refusal, identifiers: list[str], other: str | None) -> None:
        self.rule = refusal.rule
        self.detail = refusal.detail
        self.identifiers = identifiers
        self.other = other


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _holds_profiles(
    operation: Callable[Concatenate[IdentityGraph, _P], _R],
) -> Callable[Concatenate[IdentityGraph, _P], _R]:
    """Mark an operation (link, split, erase) under way while it runs: it holds decoded profiles, so the
    profile cache must not rotate meanwhile (`IdentityGraph._holding`)."""

    @functools.wraps(operation)
    def held(graph: IdentityGraph, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        graph._holding += 1
        try:
            return operation(graph, *args, **kwargs)
        finally:
            graph._holding -= 1

    return held


class IdentityGraph:
    """Deterministic stitching over a Store: link, lookup, explain, split, erase.

    Reads go through two two-generation in-memory caches (young/old dicts, rotated at a flush when young
    exceeds its size): `cache_profiles` decoded profiles (hot), and below them `cold_profiles` profiles as
    their stored bytes (about 450 bytes each instead of 3-4 KB of Python objects, invisible to the garbage
    collector, decoded in a few µs instead of a RocksDB read); `cache_identifiers` identifier owners.
    Writes are buffered and written as one batch every `flush_every` events, so the common event (known
    identifiers, one profile, nothing to decide) touches only dicts.
    """

    def __init__(
        self,
        store: Store | None = None,
        rules: Rules | None = None,
        *,
        cache_profiles: int = 100_000,
        cold_profiles: int = 1_000_000,
        cache_identifiers: int = 1_000_000,
        flush_every: int = 20_000,
        history: bool = True,
        on_event: Callable[[ProfileState, NormalizedEvent], None] | None = None,
    ) -> None:
        self.store: Store = store if store is not None else MemoryStore()
        self.rules = rules if rules is not None else Rules()
        self._rank = self.rules.rank
        self._unranked = len(self._rank)
        self._cache_profiles = max(cache_profiles, 1)
        self._cold_profiles = max(cold_profiles, 0)
        self._cache_identifiers = max(cache_identifiers, 1)
        self._flush_every = max(flush_every, 1)
        self._history = history
        self._on_event = on_event
        self._p_young: dict[str, ProfileState] = {}
        self._p_old: dict[str, ProfileState] = {}
        # operations under way (link, split, erase): they hold decoded profiles, so the profile cache does not
        # rotate meanwhile. Dropping one they hold would have the next read decode a second copy, and the
        # copy touched last overwrite the other's changes (a refusal's `seq` went back by two, caches of one)
        self._holding = 0
        self._b_young: dict[str, bytes] = {}  # encoded as last written to the store
        self._b_old: dict[str, bytes] = {}
        self._i_young: dict[str, str] = {}  # "" = known absent (deleted since the last flush)
        self._i_old: dict[str, str] = {}
        self._dirty_p: dict[str, ProfileState] = {}
        self._dirty_i: dict[str, str | None] = {}
        self._writes: list[tuple[bytes, bytes | None]] = []
        self._since_flush = 0
        # while every stored identifier / profile is also in its cache (a fresh store, no generation dropped
        # yet), a cache miss means "new": no store read (one per new identifier and per new profile id)
        self._i_complete = next(iter(self.store.iter_prefix(b"i:")), None) is None
        self._p_complete = self._cold_profiles > 0 and next(iter(self.store.iter_prefix(b"p:")), None) is None
        self._neighbours_indexed = self.store.get(_NEIGHBOUR_INDEX_KEY) is not None
        if not self._neighbours_indexed and next(iter(self.store.iter_prefix(b"p:")), None) is None:
            self._writes.append((_NEIGHBOUR_INDEX_KEY, b"1"))  # a new state: indexed from its first code on
            self._neighbours_indexed = True
        self._generic: set[str] = set()  # values that no longer link: generic, or shared (a subset)
        self._shared: set[str] = set()
        for k, v in self.store.iter_prefix(b"g:"):
            self._generic.add(k[2:].decode())
            if v == _SHARED_MARK:
                self._shared.add(k[2:].decode())
        raw = self.store.get(_STATS_KEY)
        self.stats: dict[str, Any] = orjson.loads(raw) if raw else {}
        for name in (
            "events",
            "profiles_created",
            "profiles_live",
            "merges",
            "splits",
            "erased",
            "generic",
            "shared",
        ):
            self.stats.setdefault(name, 0)
        self.stats.setdefault("refusals", {})
        if (
            self.stats["splits"]
            and self.store.get(_OLD_SPLITS_RECORDED_KEY) is None
            and next(iter(self.store.iter_prefix(_SPLIT_PREFIX)), None) is None
        ):
            self._record_old_splits()

    @property
    def cache_profiles(self) -> int:
        """How many profiles the hot cache keeps decoded before rotating."""
        return self._cache_profiles

    @property
    def cold_profiles(self) -> int:
        """How many profiles the cold cache keeps as encoded bytes before rotating (0 = none)."""
        return self._cold_profiles

    @property
    def cache_identifiers(self) -> int:
        """How many identifier owners the index cache keeps before rotating."""
        return self._cache_identifiers

    # ------------------------------------------------------------------------------------------------
    # cache / store plumbing

    def _get_profile(self, pid: str) -> ProfileState | None:
        p = self._p_young.get(pid)
        if p is None:
            p = self._p_old.pop(pid, None)
            if p is None:
                raw = self._b_young.get(pid)
                if raw is None:
                    raw = self._b_old.pop(pid, None)
                    if raw is None:
                        if self._p_complete:
                            return None
                        raw = self.store.get(b"p:" + pid.encode())
                        if raw is None:
                            return None
                    if self._cold_profiles:
                        self._b_young[pid] = raw
                p = ProfileState.decode(raw)
            self._p_young[pid] = p
            if len(self._p_young) > self._cache_profiles and not self._dirty_p and not self._holding:
                # nothing waits for a flush (the replay's final step, explain, lookups): rotate now, or a
                # read-only pass over every profile keeps them all decoded (4 KB each)
                self._p_old, self._p_young = self._p_young, {}
        return p

    def _live(self, pid: str) -> ProfileState | None:
        """Follow merged_into to the live (or erased) profile."""
        p = self._get_profile(pid)
        while p is not None and p.status == MERGED and p.merged_into is not None:
            p = self._get_profile(p.merged_into)
        return p

    def _owner(self, key: str) -> str | None:
        pid = self._i_young.get(key)
        if pid is None:
            pid = self._i_old.pop(key, None)
            if pid is None:
                raw = None if self._i_complete else self.store.get(b"i:" + key.encode())
                # a miss is cached too ("" = known absent): a new identifier is asked for several times
                # by one event (hot path, slow path, link step) and each store miss costs a RocksDB read
                pid = "" if raw is None else raw.decode()
            self._i_young[key] = pid
        return pid or None

    def _set_owner(self, key: str, pid: str | None) -> None:
        self._i_young[key] = pid or ""
        self._dirty_i[key] = pid

    def _touch(self, p: ProfileState) -> None:
        self._dirty_p[p.id] = p

    def flush(self) -> None:
        """Write every buffered change to the store in one batch, then trim the cache."""
        # a generator, not a list: each profile is encoded only as the batch takes it, so the encoded bytes
        # are held once (inside the store's batch), not twice
        self.store.write_batch(self._flush_items())
        self._dirty_p.clear()
        self._dirty_i.clear()
        self._writes = []
        self._since_flush = 0
        if len(self._p_young) > self._cache_profiles and not self._holding:
            self._p_old, self._p_young = self._p_young, {}
        if len(self._b_young) > self._cold_profiles:
            self._p_complete = self._p_complete and not self._b_old
            self._b_old, self._b_young = self._b_young, {}
        if len(self._i_young) > self._cache_identifiers:
            self._i_complete = self._i_complete and not self._i_old
            self._i_old, self._i_young = self._i_young, {}

    def _flush_items(self) -> Iterator[tuple[bytes, bytes | None]]:
        # (key, encoded value | None = delete) for everything buffered since the last flush
        keep = self._cold_profiles > 0
        b_young, b_old = self._b_young, self._b_old
        for pid, p in self._dirty_p.items():
            raw = p.encode()  # exact-size bytes (orjson's, which the row was until 0.4.4, were 8 KB buffers)
            if keep:
                b_young[pid] = raw
                b_old.pop(pid, None)
            yield b"p:" + pid.encode(), raw
        for key, owner in self._dirty_i.items():
            yield b"i:" + key.encode(), None if owner is None else owner.encode()
        yield from self._writes
        yield _STATS_KEY, orjson.dumps(self.stats)

    def compact(self) -> None:
        """Write what is buffered, then have the store rewrite its files: after an erase, no copy stays."""
        self.flush()
        self.store.compact()

    def close(self) -> None:
        """Flush and close the store."""
        self.flush()
        self.store.close()

    # ------------------------------------------------------------------------------------------------
    # changes

    def _emit(
        self,
        out: list[IdentityChange],
        p: ProfileState,
        kind: ChangeKind,
        ev_id: str | None,
        at: int,
        payload: dict[str, Any],
    ) -> None:
        p.seq += 1
        change = IdentityChange(kind, p.id, p.seq, ev_id, at, payload)
        out.append(change)
        self._touch(p)
        if self._history:
            hkey = f"h:{p.id}:{p.seq:010d}"
            # an exact-size copy: orjson's 8 KB buffers would otherwise be held until the flush
            entry = orjson.dumps({"k": kind.value, "e": ev_id, "t": at, **payload})
            self._writes.append((hkey.encode(), bytes(memoryview(entry))))
            if kind is ChangeKind.REFUSED:
                # so erasing one of the named identifiers can find and drop this entry, and explain list it
                for key in payload.get("identifiers", ()):
                    self._writes.append((f"r:{key}:{p.id}:{p.seq:010d}".encode(), hkey.encode()))

    def _refused(self, rule: str) -> None:
        refusals = self.stats["refusals"]
        refusals[rule] = refusals.get(rule, 0) + 1

    # ------------------------------------------------------------------------------------------------
    # link

    def link_many(self, events: Iterable[NormalizedEvent]) -> Iterator[LinkResult]:
        """Batch path: link events in order (writes go out in batches), flushing at the end."""
        link = self.link
        for ev in events:
            yield link(ev)
        self.flush()

    def link(self, ev: NormalizedEvent) -> LinkResult:
        """Stitch one event: attach, create or merge profiles as the rules allow; returns its profile."""
        self.stats["events"] += 1
        self._since_flush += 1
        if self._since_flush >= self._flush_every:
            self.flush()
        return self._link(ev)

    @_holds_profiles
    def _link(self, ev: NormalizedEvent) -> LinkResult:
        if ev.type == ERASE_TYPE:
            return self._erase_event(ev)
        # hot path: every identifier known, none generic, all in one live profile; pure dict lookups, the
        # anchor is the identifier of best (rank, key) — no sorting, no lists
        generic = self._generic
        i_young = self._i_young
        rank = self._rank
        unranked = self._unranked
        first: str | None = None
        anchor = ""
        best = -1
        seen: list[str] = []  # the keys, so the touch loop below does not format them again
        for ident in ev.identifiers:
            key = ident.key
            seen.append(key)
            pid = i_young.get(key)
            if pid is None:
                pid = self._owner(key)
            if not pid or key in generic or (first is not None and pid != first):
                break
            first = pid
            r = rank.get(ident.type, unranked)
            if best < 0 or r < best or (r == best and key < anchor):
                best = r
                anchor = key
        else:
            if first is not None:
                p = self._p_young.get(first)
                if p is None:
                    p = self._get_profile(first)
                if p is not None and p.status == ACTIVE:
                    at = ev.occurred_at_ms
                    ids = p.ids
                    # what can raise before any change, so a failed link leaves the profile as it was: a
                    # record missing from the profile its owner row names (KeyError), an order's revenue
                    # sum (decimal's Overflow; `record_event` sums before it counts)
                    recs = [ids[key] for key in seen]
                    p.record_event(ev)
                    for rec, ident in zip(recs, ev.identifiers, strict=True):
                        if at > rec[R_LAST]:
                            rec[R_LAST] = at
                        if ident.verified and not rec[R_VERIFIED]:
                            rec[R_VERIFIED] = True
                    if self._on_event is not None:
                        self._on_event(p, ev)
                    self._dirty_p[first] = p
                    return LinkResult(first, _NO_CHANGES, anchor)
        # ("key", Identifier) in priority order, generic values left out
        ordered = sorted(((rank.get(i.type, unranked), i.key), i) for i in ev.identifiers)
        keys: list[str] = []
        idents: list[Identifier] = []
        prev = None
        for rk, ident in ordered:
            key = rk[1]
            if key not in generic and key != prev:
                keys.append(key)
                idents.append(ident)
            prev = key
        if not keys:
            return _NOTHING
        owner = self._owner
        owners = [owner(k) for k in keys]
        return self._link_slow(ev, keys, idents, owners)

    def _aggregate(self, p: ProfileState, ev: NormalizedEvent) -> None:
        p.record_event(ev)
        if self._on_event is not None:
            self._on_event(p, ev)
        self._dirty_p[p.id] = p

    def _track_generic(
        self,
        keys: list[str],
        idents: list[Identifier],
        owners: list[str | None],
        new_nb: dict[str, list[int]],
    ) -> list[int]:
        """Record strong neighbours seen across profile boundaries; return indices of values now generic."""
        rules = self.rules
        gmax = rules.generic_max
        gtypes = rules.generic_types
        mark = rules.generic_active
        strong = [(j, _nb_code(i), i.type) for j, i in enumerate(idents) if i.type in gmax]
        if not strong:
            return []
        became: list[int] = []
        for xi, ident in enumerate(idents):
            if ident.type not in gtypes:
                continue
            ox = owners[xi]
            add = [(code, t) for j, code, t in strong if j != xi and (ox is None or owners[j] != ox)]
            if not add:
                continue
            if ox is None:
                nb = new_nb.setdefault(keys[xi], [])
            else:
                p = self._get_profile(ox)
                if p is None:  # pragma: no cover - index and profiles are written together
                    continue
                rec = p.ids[keys[xi]]
                nb = rec[R_NB]
                if nb is None:
                    nb = rec[R_NB] = []
                self._touch(p)
            for code, t in add:
                if code not in nb:
                    nb.append(code)
                    if ox is not None:  # a new value's codes are indexed when a record takes them (`_record`)
                        self._writes.append((_seen_with(code, keys[xi]), b""))
                tag = code >> 32
                if mark and sum(1 for c in nb if c >> 32 == tag) > gmax[t]:
                    became.append(xi)
                    break
        return became

    def _link_slow(
        self, ev: NormalizedEvent, keys: list[str], idents: list[Identifier], owners: list[str | None]
    ) -> LinkResult:
        rules = self.rules
        at = ev.occurred_at_ms
        ev_id = ev.event_id
        changes: list[IdentityChange] = []
        deferred: list[_Pending] = []
        new_nb: dict[str, list[int]] = {}

        # step "evidence": what each known soft value had been seen with before this event; only merges of two
        # existing profiles need it (the event's brand-new identifiers joining one profile are an attach)
        seen_with: dict[str, list[int]] = {}
        if rules.corroborate_active and len(keys) > 1:
            for key, own in zip(keys, owners, strict=True):
                if own is not None:
                    op = self._get_profile(own)
                    rec = op.ids.get(key) if op is not None else None
                    if rec is not None and rec[R_NB]:
                        seen_with[key] = list(rec[R_NB])

        # step "generic": values seen with too many strong identifiers stop linking, for good
        if rules.tracks_neighbours and len(keys) > 1:
            became = self._track_generic(keys, idents, owners, new_nb)
            if became:
                for xi in became:
                    key = keys[xi]
                    self._generic.add(key)
                    self._writes.append((b"g:" + key.encode(), b"1"))
                    self.stats["generic"] += 1
                    self._refused(RULE_GENERIC)
                    deferred.append(
                        _Pending(
                            Refusal(RULE_GENERIC, "value seen with too many distinct strong identifiers"),
                            [key],
                            owners[xi],
                        )
                    )
                drop = set(became)
                keys = [k for i, k in enumerate(keys) if i not in drop]
                idents = [x for i, x in enumerate(idents) if i not in drop]
                owners = [o for i, o in enumerate(owners) if i not in drop]
                if not keys:
                    return LinkResult(
                        None, tuple(self._flush_deferred(changes, deferred, None, ev_id, at)), None
                    )

        # step "anchor": the highest-priority identifier decides the event's profile
        pending: ProfileState | None = None
        anchor_owner = owners[0]
        target: ProfileState | None = None
        if anchor_owner is not None:
            target = self._get_profile(anchor_owner)
        if target is None or target.status != ACTIVE:
            pending = ProfileState(self._fresh_id(ev_id, at), at)
            pending.add_identifier(keys[0], self._record(idents[0], ev, pending.id, new_nb.get(keys[0])))
            target = pending
        side_t: list[Identifier] = [idents[0]]
        handled: dict[str, _Pending | None] = {}  # other profile id → its refusal (None = merged)
        missing = _Pending(Refusal("", ""), [], None)

        # step "link": each further identifier in priority order joins, merges or is refused
        for idx in range(1, len(keys)):
            key = keys[idx]
            ident = idents[idx]
            own = self._owner(key)
            if pending is not None and key in pending.ids:
                continue
            if own == target.id:
                side_t.append(ident)
                continue
            if own is None:
                refusal = check_attach(target, ident, rules, at)
                if refusal is not None:
                    self._refused(refusal.rule)
                    deferred.append(_Pending(refusal, [key], None))
                    continue
                rec = self._record(ident, ev, target.id, new_nb.get(key))
                if pending is not None:
                    pending.add_identifier(key, rec)
                else:
                    target.add_identifier(key, rec)
                    self._set_owner(key, target.id)
                    self._emit(
                        changes,
                        target,
                        ChangeKind.ATTACHED,
                        ev_id,
                        at,
                        {"identifier": key, "bridge": [i.key for i in side_t]},
                    )
                side_t.append(ident)
                continue
            prior = handled.get(own, missing)
            if prior is not missing:
                if prior is not None:
                    prior.identifiers.append(key)
                continue
            other = self._get_profile(own)
            if other is None or other.status != ACTIVE:  # pragma: no cover - index points at live profiles
                continue
            side_o = [idents[j] for j in range(idx, len(keys)) if self._owner(keys[j]) == own]
            self._refresh_apart(target)
            self._refresh_apart(other)
            refusal = check_merge(
                target,
                other,
                side_t,
                side_o,
                rules,
                at,
                corroborated=pending is not None or _corroborated(side_t, side_o, seen_with),
            )
            if refusal is not None:
                self._refused(refusal.rule)
                entry = _Pending(refusal, [key], other.id)
                handled[own] = entry
                deferred.append(entry)
                continue
            handled[own] = None
            bridge_t = [i.key for i in side_t]
            bridge_o = [i.key for i in side_o]
            if pending is not None:
                # the event's new identifiers join an existing profile: no profile is created
                for pkey, prec in pending.ids.items():
                    prec[R_ORIGIN] = other.id
                    other.add_identifier(pkey, prec)
                    self._set_owner(pkey, other.id)
                    self._emit(
                        changes,
                        other,
                        ChangeKind.ATTACHED,
                        ev_id,
                        at,
                        {"identifier": pkey, "bridge": bridge_o},
                    )
                target = other
                pending = None
            else:
                target = self._merge(changes, target, other, ev_id, at, bridge_t, bridge_o)
            side_t.extend(side_o)

        if pending is not None:
            # step "create": nothing known joined, the event starts a profile
            target = pending
            self._p_young[target.id] = target
            for key in target.ids:
                self._set_owner(key, target.id)
            self.stats["profiles_created"] += 1
            self.stats["profiles_live"] += 1
            self._emit(
                changes,
                target,
                ChangeKind.CREATED,
                ev_id,
                at,
                {"identifiers": sorted(target.ids), "anchor": keys[0]},
            )

        # step "touch": identifiers of the event now in the target get last seen / verified
        ids = target.ids
        for key, ident in zip(keys, idents, strict=True):
            trec = ids.get(key)
            if trec is not None:
                if at > trec[R_LAST]:
                    trec[R_LAST] = at
                if ident.verified and not trec[R_VERIFIED]:
                    trec[R_VERIFIED] = True
        self._aggregate(target, ev)
        if rules.shared_active and len(keys) > 1:
            self._track_shared(keys, idents, target, deferred)
        return LinkResult(
            target.id, tuple(self._flush_deferred(changes, deferred, target, ev_id, at)), keys[0]
        )

    def _track_shared(
        self, keys: list[str], idents: list[Identifier], target: ProfileState, deferred: list[_Pending]
    ) -> None:
        """Weak values of the event left in another person's profile: count the people; mark shared ones.

        The evidence is a link refused or not attempted: the event's person identifiers are in `target`, a
        weak value of the event stayed in another profile that holds person identifiers too — someone else
        logged in on the family tablet. Past links stay; the value stops attributing (like a generic one).
        """
        rules = self.rules
        stypes = rules.shared_types
        ptypes = rules.shared_person_types
        tid = target.id
        if not any(i.type in ptypes and self._owner(k) == tid for k, i in zip(keys, idents, strict=True)):
            return
        code = people_code(tid)
        for key, ident in zip(keys, idents, strict=True):
            if ident.type not in stypes or key in self._generic:
                continue
            own = self._owner(key)
            if own is None or own == tid:
                continue
            other = self._get_profile(own)
            if other is None or other.status != ACTIVE or not other.has_type_in(ptypes):
                continue
            rec = other.ids.get(key)
            if rec is None:  # pragma: no cover - index and profiles are written together
                continue
            nb = rec[R_NB]
            if nb is None:
                nb = rec[R_NB] = []
            if code not in nb:
                nb.append(code)
                self._touch(other)
            people = 1 + count_people(nb)  # the owner, and the others
            if people > rules.shared_max_people:
                self._generic.add(key)
                self._shared.add(key)
                self._writes.append((b"g:" + key.encode(), _SHARED_MARK))
                self.stats["shared"] += 1
                self._refused(RULE_SHARED)
                deferred.append(
                    _Pending(
                        Refusal(RULE_SHARED, f"weak value seen with person identifiers of {people} profiles"),
                        [key],
                        other.id,
                    )
                )

    def _flush_deferred(
        self,
        changes: list[IdentityChange],
        deferred: list[_Pending],
        target: ProfileState | None,
        ev_id: str,
        at: int,
    ) -> list[IdentityChange]:
        for d in deferred:
            holder = target
            if holder is None and d.other is not None:
                holder = self._live(d.other)
            if holder is None or holder.status != ACTIVE:
                # nothing to pin it on (e.g. an unowned value turned generic): counted in stats only
                continue
            self._emit(
                changes,
                holder,
                ChangeKind.REFUSED,
                ev_id,
                at,
                {
                    "rule": d.rule,
                    "detail": d.detail,
                    "identifiers": sorted(d.identifiers),
                    "other_profile_id": d.other,
                },
            )
        return changes

    def _fresh_id(self, ev_id: str, at: int) -> str:
        """The event's derived profile id, or the next variant of it if taken (a repeated event_id with other
        identifiers)."""
        return derive_profile_id_where(ev_id, at, lambda pid: self._get_profile(pid) is None)

    def _record(
        self, ident: Identifier, ev: NormalizedEvent, origin: str, nb: list[int] | None
    ) -> IdentRecord:
        at = ev.occurred_at_ms
        for code in nb or ():
            self._writes.append((_seen_with(code, ident.key), b""))
        return [ident.type, at, at, ev.source, ident.verified, ev.event_id, origin, nb]

    def _refresh_apart(self, p: ProfileState) -> None:
        if p.apart:
            live = []
            for pid in p.apart:
                q = self._live(pid)
                if q is not None and q.status == ACTIVE and q.id not in live:
                    live.append(q.id)
            if tuple(live) != p.apart:
                p.apart = tuple(live)
                self._touch(p)

    def _merge(
        self,
        changes: list[IdentityChange],
        a: ProfileState,
        b: ProfileState,
        ev_id: str | None,
        at: int,
        bridge_a: list[str],
        bridge_b: list[str],
    ) -> ProfileState:
        """Merge two live profiles: the smaller (older) id survives, the other becomes merged_into it."""
        if b.id < a.id:
            a, b = b, a
            bridge_a, bridge_b = bridge_b, bridge_a
        moved = sorted(b.ids)
        a.absorb(b)
        for key in moved:
            self._set_owner(key, a.id)
        b.status = MERGED
        b.merged_into = a.id
        b.ids = {}
        b.types = {}
        self._touch(b)
        self.stats["merges"] += 1
        self.stats["profiles_live"] -= 1
        self._emit(
            changes,
            a,
            ChangeKind.MERGED,
            ev_id,
            at,
            {
                "merged_profile_id": b.id,
                "identifiers_moved": moved,
                "bridge": bridge_a,
                "bridge_other": bridge_b,
            },
        )
        return a

    # ------------------------------------------------------------------------------------------------
    # queries

    def lookup(self, identifier: str) -> str | None:
        """Live profile id holding `identifier` ("type:value"), or None."""
        pid = self._owner(identifier)
        if pid is None:
            return None
        p = self._live(pid)
        return p.id if p is not None and p.status == ACTIVE else None

    def resolve(self, profile_id: str) -> str | None:
        """Where an emitted profile id leads now (following merges): a live or erased id; None if unknown."""
        p = self._live(profile_id)
        return None if p is None else p.id

    def profile(self, profile_id: str) -> ProfileState | None:
        """The profile an id resolves to (live or erased tombstone), or None if never seen."""
        return self._live(profile_id)

    def is_generic(self, identifier: str) -> bool:
        """Whether the value no longer links: marked generic, or a weak value marked shared."""
        return identifier in self._generic

    def is_shared(self, identifier: str) -> bool:
        """Whether a weak value (device, cookie) was marked shared: seen with several people's identifiers."""
        return identifier in self._shared

    def final_profile(self, profile_id: str | None, anchor: str | None = None) -> str | None:
        """The profile an event assigned to `profile_id` belongs to now: merges and splits followed.

        None when the profile was erased, or when the event's anchoring identifier has since been found
        generic (a shared tablet, a cashier's phone): whoever it was, it cannot be told any more, so the
        event is no longer attributed. If the anchoring identifier has since been split off into a profile
        descending from it, the event follows its identifier.
        """
        if profile_id is None or (anchor is not None and anchor in self._generic):
            return None
        p = self._live(profile_id)
        if p is None or p.status != ACTIVE:
            return None
        if anchor is not None:
            q_id = self.lookup(anchor)
            if q_id is not None and q_id != p.id:
                q = self._get_profile(q_id)
                # the anchor's record remembers the split that moved it, whatever merged since (a profile that
                # absorbed the split-off one has no `split_from` of its own)
                via = q.ids[anchor][R_VIA] if q is not None and anchor in q.ids else None
                if isinstance(via, str) and via.startswith("split:"):
                    parent = self._live(via[6:])
                    if parent is not None and parent.id == p.id:
                        return q_id
                if p.id in self._lineage(q_id):  # stops where it finds it
                    return q_id
        return p.id

    def iter_identifiers(self) -> Iterator[tuple[str, str]]:
        """Every stored (identifier, live profile id), in key order (flushes first)."""
        self.flush()
        for k, v in self.store.iter_prefix(b"i:"):
            p = self._live(v.decode())
            if p is not None and p.status == ACTIVE:
                yield k[2:].decode(), p.id

    def iter_profiles(self) -> Iterator[ProfileState]:
        """Every live profile (flushes first)."""
        self.flush()
        for _, v in self.store.iter_prefix(b"p:"):
            p = ProfileState.decode(v)
            if p.status == ACTIVE:
                yield self._get_profile(p.id) or p

    def history(self, profile_id: str) -> list[dict[str, Any]]:
        """The stored changes of one profile id (not following merges), oldest first."""
        self.flush()
        return [orjson.loads(v) for _, v in self.store.iter_prefix(f"h:{profile_id}:".encode())]

    def explain(self, target: str) -> dict[str, Any]:
        """Why an identifier sits in its profile, or how a profile came to be (see streams.core.explain)."""
        from streams.core.explain import explain

        return explain(self, target)

    # ------------------------------------------------------------------------------------------------
    # operator actions

    def split(
        self, profile_id: str, identifiers: Sequence[str], *, at_ms: int | None = None, reason: str = ""
    ) -> tuple[str, tuple[IdentityChange, ...]]:
        """Unmerge: move `identifiers` (and their future events) to a new profile that never re-merges."""
        return self._split(profile_id, identifiers, at_ms, reason)

    @_holds_profiles
    def _split(
        self, profile_id: str, identifiers: Sequence[str], at_ms: int | None, reason: str
    ) -> tuple[str, tuple[IdentityChange, ...]]:
        p = self._live(profile_id)
        if p is None or p.status != ACTIVE:
            raise UnknownProfileOrIdentifier(f"no live profile {profile_id}")
        keys = sorted(set(identifiers))
        missing = [k for k in keys if k not in p.ids]
        if missing or not keys:
            raise UnknownProfileOrIdentifier(f"not in profile {p.id}: {', '.join(missing) or '(none given)'}")
        if len(keys) == len(p.ids):
            raise ValueError("cannot split every identifier off a profile")
        at = p.last_ms if at_ms is None else at_ms
        n = ProfileState(derive_split_id(p.id, keys, p.seq, at), at)
        n.split_from = p.id
        self._writes.append((_SPLIT_PREFIX + n.id.encode(), orjson.dumps([p.id])))
        for key in keys:
            rec = p.remove_identifier(key)
            assert rec is not None
            rec[R_ORIGIN] = n.id
            rec[R_VIA] = f"split:{p.id}"
            n.add_identifier(key, rec)
            self._set_owner(key, n.id)
        n.apart = (p.id,)
        p.apart = (*p.apart, n.id)
        self._p_young[n.id] = n
        self.stats["splits"] += 1
        self.stats["profiles_created"] += 1
        self.stats["profiles_live"] += 1
        changes: list[IdentityChange] = []
        self._emit(
            changes,
            p,
            ChangeKind.SPLIT,
            None,
            at,
            {"split_profile_id": n.id, "identifiers": keys, "reason": reason},
        )
        self._emit(
            changes,
            n,
            ChangeKind.CREATED,
            None,
            at,
            {"identifiers": keys, "split_from": p.id, "reason": reason},
        )
        return n.id, tuple(changes)

    def erase(
        self, target: str, *, event_id: str | None = None, at_ms: int = 0
    ) -> tuple[IdentityChange, ...]:
        """Right to be forgotten: erase a whole profile (by id), or one identifier ("type:value")."""
        return self._erase(target, event_id, at_ms)

    @_holds_profiles
    def _erase(self, target: str, event_id: str | None, at_ms: int) -> tuple[IdentityChange, ...]:
        changes: list[IdentityChange] = []
        p = self._live(target)
        if p is not None:
            if p.status == ACTIVE:
                self._erase_profile(changes, p, event_id, at_ms)
            return tuple(changes)
        pid = self._owner(target)
        if pid is None and target not in self._generic and not self.refusals_naming(target):
            raise UnknownProfileOrIdentifier(f"unknown profile or identifier {target}")
        self._erase_keys([target])
        if pid is not None:
            q = self._live(pid)
            if q is not None and q.status == ACTIVE:
                q.remove_identifier(target)
                self._touch(q)
                if not q.ids:
                    self._erase_profile(changes, q, event_id, at_ms, also_redact=[target])
                else:
                    self._redact_history(list(self._lineage(q.id)), [target])
        return tuple(changes)

    def _lineage(self, profile_id: str) -> Iterator[str]:
        """Every profile whose history may name an identifier `profile_id` holds now: the profiles merged into
        it and, transitively, those any of them was split off, with what those merged.

        A merged-away or erased profile keeps no `split_from` (nor, erased, its `merged_from`), so the split
        edges are read from `s:` rows. Following just the live profile's `split_from` missed the start of a
        chain split, merged, then split again, and a chain through an erased profile.
        """
        if self._writes:
            self.flush()  # the rows read below
        seen: set[str] = set()
        pending = [profile_id]
        while pending:
            q = self._live(pending.pop())
            if q is None or q.id in seen:
                continue
            for pid in (q.id, *q.merged_from):
                if pid not in seen:
                    seen.add(pid)
                    yield pid
            pending.extend(self._split_parents(q))

    def _split_parents(self, q: ProfileState) -> list[str]:
        """The profiles that `q` or a profile merged into it was split off (the store must be flushed)."""
        out = [q.split_from] if q.split_from is not None else []
        for pid in (q.id, *q.merged_from):
            raw = self.store.get(_SPLIT_PREFIX + pid.encode())
            if raw is not None:
                out.extend(orjson.loads(raw))
        return out

    def _record_old_splits(self) -> None:
        """The `s:` rows of a state split before 0.4.4, which wrote none, from its histories (once: a marker
        row says so, as erases may have left nothing to record): a split profile's first entry is its
        `profile_created`, naming the profile it was split off."""
        self._writes.append((_OLD_SPLITS_RECORDED_KEY, b"1"))
        for hkey, raw in self.store.iter_prefix(b"h:"):
            if hkey.endswith(b":%010d" % 1) and b'"split_from"' in raw:
                parent = orjson.loads(raw).get("split_from")
                if isinstance(parent, str):
                    pid = hkey[2 : hkey.rindex(b":")]
                    self._writes.append((_SPLIT_PREFIX + pid, orjson.dumps([parent])))

    def _redact_history(self, profile_ids: list[str], keys: list[str]) -> None:
        """Replace erased identifiers in stored history entries by a placeholder."""
        if not keys:
            return
        self.flush()  # entries as last written, earlier redactions included
        for pid in profile_ids:
            for hkey, raw in list(self.store.iter_prefix(f"h:{pid}:".encode())):
                redacted: bytes = raw
                for key in keys:
                    if key.encode() in redacted:
                        redacted = redacted.replace(orjson.dumps(key), b'"<erased>"')
                if redacted is not raw:
                    self._writes.append((hkey, redacted))

    def _erase_event(self, ev: NormalizedEvent) -> LinkResult:
        changes: list[IdentityChange] = []
        for ident in ev.identifiers:
            key = ident.key
            pid = self._owner(key)
            if pid is not None:
                p = self._live(pid)
                if p is not None and p.status == ACTIVE:
                    self._erase_profile(changes, p, ev.event_id, ev.occurred_at_ms)
            self._erase_keys([key])
        return LinkResult(None, tuple(changes), None)

    def _refusal_refs(self, key: str) -> list[tuple[bytes, bytes]]:
        """(index key, history key) of every refusal naming `key` in the `r:` index, its entry kept or not.

        Only `key` itself: a value may hold ':' (a cookie), so the scan of `r:cookie_id:a:` also meets
        `cookie_id:a:b`'s entries; after the key, an entry's index key holds `<profile id>:<seq>`, one ':'.
        """
        self.flush()
        prefix = f"r:{key}:".encode()
        return [(r, h) for r, h in self.store.iter_prefix(prefix) if r.count(b":", len(prefix)) == 1]

    def refusals_naming(self, key: str) -> list[tuple[str, dict[str, Any]]]:
        """(profile id, history entry) of the stored refusals that name `key`, on whichever profile."""
        out: list[tuple[str, dict[str, Any]]] = []
        for _, hkey in self._refusal_refs(key):
            raw = self.store.get(hkey)
            if raw is not None:
                out.append((hkey.split(b":")[1].decode(), orjson.loads(raw)))
        return out

    def _drop_entry(self, hkey: bytes, raw: bytes) -> None:
        """Delete one history entry; a refusal's `r:` index keys go with it (they name other identifiers)."""
        self._writes.append((hkey, None))
        if b'"merge_refused"' in raw:
            entry = orjson.loads(raw)
            if entry.get("k") == ChangeKind.REFUSED.value:
                _, pid, seq = hkey.decode().split(":")
                for key in entry.get("identifiers", ()):
                    self._writes.append((f"r:{key}:{pid}:{seq}".encode(), None))

    def _erase_keys(self, keys: list[str]) -> None:
        """Drop identifier-level traces: index entry, generic mark, refusals naming it elsewhere, and its
        neighbour code in the records of the values it was seen with (which corroboration and generic counts
        read: left there, a value erased and seen again would still count as seen before)."""
        self.flush()
        for key in keys:
            self._forget_neighbours(key)
            self._set_owner(key, None)
            if key in self._generic:
                self._generic.discard(key)
                self._shared.discard(key)
                self._writes.append((b"g:" + key.encode(), None))
            for rkey, hkey in self._refusal_refs(key):
                self._writes.append((rkey, None))  # even when its entry went already (an erased profile's)
                raw = self.store.get(hkey)
                if raw is not None:
                    self._drop_entry(hkey, raw)

    def _forget_neighbours(self, key: str) -> None:
        """Remove `key`'s code from every record holding it (the `n:` index), and the index keys of the codes
        `key`'s own record holds; the store must be flushed."""
        if not self._neighbours_indexed:
            self._index_neighbours()
        pid = self._owner(key)
        p = self._live(pid) if pid is not None else None
        rec = p.ids.get(key) if p is not None else None
        for code in (rec[R_NB] or ()) if rec is not None else ():
            self._writes.append((_seen_with(code, key), None))
        code = neighbour_code(key)
        prefix = _seen_with(code, "")
        for nkey, _ in list(self.store.iter_prefix(prefix)):
            self._writes.append((nkey, None))
            holder = nkey[len(prefix) :].decode()
            owner = self._owner(holder)
            q = self._live(owner) if owner is not None else None
            held = q.ids.get(holder) if q is not None else None
            if q is not None and held is not None and held[R_NB] and code in held[R_NB]:
                held[R_NB] = [c for c in held[R_NB] if c != code]
                self._touch(q)

    def _index_neighbours(self) -> None:
        """Index the neighbour codes of a state written before the `n:` index existed, at its first erase.

        People codes (`_track_shared`) name profiles, not values: an erase never looks them up, so they are
        left out, as `_track_shared` leaves them.
        """
        for _, raw in self.store.iter_prefix(b"p:"):
            for key, rec in ProfileState.decode(raw).ids.items():
                for code in rec[R_NB] or ():
                    if not is_people_code(code):
                        self._writes.append((_seen_with(code, key), b""))
        self._writes.append((_NEIGHBOUR_INDEX_KEY, b"1"))
        self._neighbours_indexed = True
        self.flush()

    def _erase_profile(
        self,
        out: list[IdentityChange],
        p: ProfileState,
        ev_id: str | None,
        at: int,
        also_redact: Sequence[str] = (),
    ) -> None:
        """Wipe `p`, drop its histories, and redact its identifiers (and `also_redact`, removed from it
        already) in the histories of the profiles it descends from by splits."""
        keys = sorted(p.ids)
        gone = {p.id, *p.merged_from}
        self._erase_keys(keys)  # flushes
        # the wipe forgets what `p` absorbed and the drop below their histories: keep their split edges
        parents = list(dict.fromkeys(self._split_parents(p)))
        if parents:
            self._writes.append((_SPLIT_PREFIX + p.id.encode(), orjson.dumps(parents)))
        self._redact_history([pid for pid in self._lineage(p.id) if pid not in gone], [*keys, *also_redact])
        for pid in [p.id, *p.merged_from]:
            for hkey, raw in list(self.store.iter_prefix(f"h:{pid}:".encode())):
                self._drop_entry(hkey, raw)
        p.wipe(ERASED)
        p.seq += 1
        self._touch(p)
        self.stats["erased"] += 1
        self.stats["profiles_live"] -= 1
        out.append(IdentityChange(ChangeKind.ERASED, p.id, p.seq, ev_id, at, {}))
