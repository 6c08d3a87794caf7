"""Partitioned stitching protocol (docs/stream-protocol.md §2-§8): pure handlers, no Kafka, no Faust.

Each identifier `k` is a register owned by `part(k)`; each profile `P` is a state machine owned by `home(P)`.
A partition's rows live behind `PartitionState` (hot cache over a bytes `RowStore`); `handle` processes one
logical message against them and returns `Effects`: outputs to publish and messages for other partitions.
Messages for the partition being processed are handled inline, in the same call. The Faust glue and the
deterministic simulator (tests/unit/protocol_sim.py) both drive this module.

Item shapes:
    NormalizedEvent ─ingest─▶ Route ─▶ Apply ─▶ Claim ─▶ ClaimOk | ClaimTaken ─▶ MergeAsk ─▶ MergeOffer ─▶ …
    handle(state, msg) ─▶ Effects(resolved, changes, profiles, sends{dest: [msg, …]}, dropped)

Rule decisions stay in the core's pure `check_attach` / `check_merge`; this module only decides *where* and
*when* they run (on exact states: a loser is frozen by its lock, a winner decides with no claims in flight).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar, Literal, Protocol

import orjson

from streams.core import ChangeKind, IdentityChange, ProfileState, Refusal, Rules, check_attach, check_merge
from streams.core.graph import ERASE_TYPE
from streams.core.ids import derive_profile_id_where
from streams.core.rules import (
    RULE_GENERIC,
    RULE_SHARED,
    RULE_UNCORROBORATED,
    RULE_UNVERIFIED_BRIDGE,
    RULE_WEAK_BRIDGE,
)
from streams.core.state import (
    ACTIVE,
    ERASED,
    MERGED,
    R_FIRST,
    R_LAST,
    R_ORIGIN,
    R_VERIFIED,
    R_VIA,
    IdentRecord,
    count_people,
    is_people_code,
    neighbour_code,
    people_code,
)
from streams.events import Identifier, NormalizedEvent
from streams.produce import murmur2_partition

__all__ = [
    "DEFERRED_INFIX",
    "ENVELOPE_VERSION",
    "FORGOTTEN_WHILE_INDEXING_KEY",
    "HOLDERS_PREFIX",
    "INDEX_PROGRESS_KEY",
    "Apply",
    "Claim",
    "ClaimGeneric",
    "ClaimOk",
    "ClaimTaken",
    "Deferred",
    "Effects",
    "Erase",
    "Forget",
    "IdRow",
    "MemoryRowStore",
    "MergeAsk",
    "MergeDone",
    "MergeNo",
    "MergeOffer",
    "Msg",
    "NewerEnvelope",
    "PartitionState",
    "ProfileRow",
    "Reassign",
    "Release",
    "Repoint",
    "Resolved",
    "Route",
    "Row",
    "RowStore",
    "Split",
    "TableName",
    "decode_envelope",
    "decode_msg",
    "deferred_key",
    "destination",
    "encode_envelopes",
    "encode_msg",
    "handle",
    "holder_key",
    "home",
    "ingest",
    "new_profile_id",
    "ordered_keys",
    "part",
]

# v2 (0.4.2) added `Forget`; v1 envelopes, of 0.4.1 and older, still read. A v1 worker stops at a v2 envelope
# (`NewerEnvelope`) instead of dead-lettering messages it does not know, with the ones beside them.
ENVELOPE_VERSION = 2
_READABLE_VERSIONS = frozenset({1, ENVELOPE_VERSION})
# an internal record carries at most this much, unless one message alone is larger (see `encode_envelopes`)
ENVELOPE_MOST_BYTES = 1 << 20

# ------------------------------------------------------------------------------------------------------------
# Routing (§0, §2)
# ------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1 << 18)
def part(key: str, n: int) -> int:
    """Owner partition of an identifier register: Kafka's murmur2 so the producer's keying agrees.

    Cached: keys recur constantly, and a hit costs less than encoding and hashing the key again.
    """
    return murmur2_partition(key.encode(), n)


@functools.lru_cache(maxsize=1 << 18)
def home(profile_id: str, n: int) -> int:
    """Home partition of a profile: the same hash as identifiers, over the profile id (cached likewise)."""
    return murmur2_partition(profile_id.encode(), n)


def new_profile_id(
    event_id: str, at_ms: int, home_partition: int, n: int, taken: Callable[[str], bool] | None = None
) -> str:
    """Deterministic id born on `home_partition` and not `taken` (`derive_profile_id_where`)."""

    def born_here(pid: str) -> bool:
        # not `home()`: candidates are new strings, and most are rejected; they would only flush its cache
        return murmur2_partition(pid.encode(), n) == home_partition and (taken is None or not taken(pid))

    return derive_profile_id_where(event_id, at_ms, born_here)


def ordered_keys(ev: NormalizedEvent, rules: Rules) -> tuple[str, ...]:
    """The event's identifier keys by the core's priority (rank, key), deduplicated: anchor first."""
    rank = rules.rank
    unranked = len(rank)
    ranked = {(rank.get(i.type, unranked), i.key) for i in ev.identifiers}
    return tuple(key for _, key in sorted(ranked))


def _type_of(key: str) -> str:
    return key.split(":", 1)[0]


# ------------------------------------------------------------------------------------------------------------
# Messages (§3)
# ------------------------------------------------------------------------------------------------------------
# Sides (bridge identifiers) travel as tuples of Identifier; events as NormalizedEvent. Every message has a
# small integer tag on the wire: [tag, field, field, …].


@dataclass(frozen=True, slots=True)
class Route:
    """An event looking for its profile at `part(keys[0])`; `dead` = a profile id known erased."""

    TAG: ClassVar[int] = 1
    ev: NormalizedEvent
    keys: tuple[str, ...]
    dead: str | None = None


@dataclass(frozen=True, slots=True)
class Apply:
    """Resolve `ev` at profile `pid`; `fresh` = `pid` was created for this very event (core's pending)."""

    TAG: ClassVar[int] = 2
    pid: str
    ev: NormalizedEvent
    keys: tuple[str, ...]
    fresh: bool = False


@dataclass(frozen=True, slots=True)
class Claim:
    """CAS `ids[key].p := pid`; `side` = pid's bridge, `others` = the event's other ids; `note`: held.

    `claiming`: keys of `side` that pid claims for this same event (in flight, maybe another profile's).
    """

    TAG: ClassVar[int] = 3
    pid: str
    key: str
    ev_id: str
    at: int
    side: tuple[Identifier, ...]
    others: tuple[Identifier, ...]
    note: bool = False
    fresh: bool = False
    claiming: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ClaimOk:
    """The register now names `pid` (or already did)."""

    TAG: ClassVar[int] = 4
    pid: str
    key: str
    ev_id: str
    at: int
    side: tuple[Identifier, ...]
    note: bool = False


@dataclass(frozen=True, slots=True)
class ClaimTaken:
    """The register names `owner`: the claimer asks for a merge. `corr` = the bridge was seen before."""

    TAG: ClassVar[int] = 5
    pid: str
    key: str
    owner: str
    ev_id: str
    at: int
    side: tuple[Identifier, ...]
    ident: Identifier
    corr: bool = False
    note: bool = False
    others: tuple[Identifier, ...] = ()


@dataclass(frozen=True, slots=True)
class ClaimGeneric:
    """The value stops linking; `newly` = this message made it so: `rule` generic, or shared at `other`."""

    TAG: ClassVar[int] = 6
    pid: str
    key: str
    ev_id: str
    at: int
    newly: bool
    note: bool = False
    rule: str = RULE_GENERIC
    other: str | None = None


@dataclass(frozen=True, slots=True)
class MergeAsk:
    """At `home(loser)`: lock and ship state to `winner` (winner < loser); `others`: the event's other ids."""

    TAG: ClassVar[int] = 7
    loser: str
    winner: str
    side_l: tuple[Identifier, ...]
    side_w: tuple[Identifier, ...]
    ev_id: str
    at: int
    corr: bool
    others: tuple[Identifier, ...] = ()


@dataclass(frozen=True, slots=True)
class MergeOffer:
    """At `home(winner)`: decide with `check_merge` on the winner's state and the frozen loser `state`."""

    TAG: ClassVar[int] = 8
    winner: str
    loser: str
    state: dict[str, Any]
    side_w: tuple[Identifier, ...]
    side_l: tuple[Identifier, ...]
    ev_id: str
    at: int
    corr: bool
    others: tuple[Identifier, ...] = ()


@dataclass(frozen=True, slots=True)
class MergeDone:
    """At `home(loser)`: the winner absorbed it; become a stub and forward."""

    TAG: ClassVar[int] = 9
    loser: str
    winner: str


@dataclass(frozen=True, slots=True)
class MergeNo:
    """At `home(loser)`: refused; unlock and go on. With `refusal`, the loser holds the event's anchor, so
    it emits the `merge_refused`: the core pins it on the event's profile (else the winner emits it)."""

    TAG: ClassVar[int] = 10
    loser: str
    winner: str
    refusal: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Repoint:
    """Path compression: `ids[key].p := dst` if it still names `src`."""

    TAG: ClassVar[int] = 11
    key: str
    src: str
    dst: str


@dataclass(frozen=True, slots=True)
class Release:
    """`ids[key].p := null` if it still names `pid`; `erase` also forgets generic mark and neighbours, and
    matches the profiles `pid` absorbed (`srcs`) too: a register may still name one whose `Repoint` is on its
    way (it then finds the register free and does nothing)."""

    TAG: ClassVar[int] = 12
    key: str
    pid: str
    erase: bool = False
    srcs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Erase:
    """Right to be forgotten: at `part(key)` (pid None) clear the register, then wipe its profile at home."""

    TAG: ClassVar[int] = 13
    key: str
    pid: str | None
    ev_id: str
    at: int


@dataclass(frozen=True, slots=True)
class WeakSeen:
    """At `part(key)`: the weak value stayed in `owner` while the event's person identifiers are in `person`.

    One more person seen with it (the core's shared-device detection); past the limit it is marked shared.
    """

    TAG: ClassVar[int] = 14
    key: str
    owner: str
    person: str
    ev_id: str
    at: int


@dataclass(frozen=True, slots=True)
class Split:
    """At `home(pid)`: an operator's split (`omnistitch split`): move `keys` to a new profile kept apart.

    Written to the internal topic by the CLI, not by a worker; `request` is the changes' `cause_event_id`, so
    the CLI can find them on `identity.changes`.
    """

    TAG: ClassVar[int] = 15
    pid: str
    keys: tuple[str, ...]
    reason: str
    at: int
    request: str


@dataclass(frozen=True, slots=True)
class Reassign:
    """At `part(key)`: `ids[key].p := dst` if it names the split profile or one it absorbed (`srcs`): a split
    moved the identifier out of a profile the register may still name by a merged id whose `Repoint` is on
    its way (that `Repoint` then finds `dst` and does nothing). Naming anyone else, the register was cleared
    by an erase since (which reaches `dst` through the split profile's `mv`) and stays as it is."""

    TAG: ClassVar[int] = 16
    key: str
    dst: str
    srcs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Forget:
    """At `partition` (an erase sends one to each): drop the erased identifiers' neighbour `codes` from the
    registers there that hold them, found by the partition's holders index (§7), as the core's `n:` index."""

    TAG: ClassVar[int] = 17
    partition: int
    codes: tuple[int, ...]


Msg = (
    Route
    | Apply
    | Claim
    | ClaimOk
    | ClaimTaken
    | ClaimGeneric
    | MergeAsk
    | MergeOffer
    | MergeDone
    | MergeNo
    | Repoint
    | Release
    | Erase
    | WeakSeen
    | Split
    | Reassign
    | Forget
)


def destination(msg: Msg, n: int) -> int:
    """The partition that owns the row a message is about."""
    return _DESTINATIONS[type(msg)](msg, n)


# by message class: one dict lookup instead of a `match` that tests the classes one by one (hot path)
_DESTINATIONS: dict[type, Callable[[Any, int], int]] = {
    Route: lambda m, n: part(m.keys[0], n),
    Apply: lambda m, n: home(m.pid, n),
    ClaimOk: lambda m, n: home(m.pid, n),
    ClaimTaken: lambda m, n: home(m.pid, n),
    ClaimGeneric: lambda m, n: home(m.pid, n),
    MergeAsk: lambda m, n: home(m.loser, n),
    MergeDone: lambda m, n: home(m.loser, n),
    MergeNo: lambda m, n: home(m.loser, n),
    MergeOffer: lambda m, n: home(m.winner, n),
    Erase: lambda m, n: part(m.key, n) if m.pid is None else home(m.pid, n),
    Claim: lambda m, n: part(m.key, n),
    Repoint: lambda m, n: part(m.key, n),
    Release: lambda m, n: part(m.key, n),
    WeakSeen: lambda m, n: part(m.key, n),
    Split: lambda m, n: home(m.pid, n),
    Reassign: lambda m, n: part(m.key, n),
    Forget: lambda m, n: m.partition,
}


# --- (de)serialisation -------------------------------------------------------------------------------------


def _ev_out(ev: NormalizedEvent) -> list[Any]:
    return [
        ev.event_id,
        ev.source,
        ev.channel,
        ev.type,
        ev.occurred_at_ms,
        [[i.type, i.value, i.verified] for i in ev.identifiers],
        ev.attributes,
        ev.consent,
        [list(d) for d in ev.dropped],
        ev.envelope,
    ]


def _ev_in(d: list[Any]) -> NormalizedEvent:
    return NormalizedEvent(
        event_id=d[0],
        source=d[1],
        channel=d[2],
        type=d[3],
        occurred_at_ms=d[4],
        identifiers=tuple(Identifier(t, v, bool(ver)) for t, v, ver in d[5]),
        attributes=d[6],
        consent=d[7],
        dropped=tuple((a, b) for a, b in d[8]),
        envelope=d[9],
    )


def _side_out(side: tuple[Identifier, ...]) -> list[list[Any]]:
    return [[i.type, i.value, i.verified] for i in side]


def _side_in(d: list[Any]) -> tuple[Identifier, ...]:
    return tuple(Identifier(t, v, bool(ver)) for t, v, ver in d)


def _others_in(d: list[Any]) -> tuple[Identifier, ...]:
    # 0.3.1 and older sent a claim's other identifiers as keys (their envelopes may still be queued)
    return tuple(_key_ident(x) if isinstance(x, str) else Identifier(x[0], x[1], bool(x[2])) for x in d)


def _key_ident(key: str) -> Identifier:
    """An identifier known by its key only (a register's view: not verified)."""
    type_, _, value = key.partition(":")
    return Identifier(type_, value, False)


def _to_obj(m: Msg) -> list[Any]:
    match m:
        case Route():
            return [m.TAG, _ev_out(m.ev), list(m.keys), m.dead]
        case Apply():
            return [m.TAG, m.pid, _ev_out(m.ev), list(m.keys), m.fresh]
        case Claim():
            return [
                m.TAG,
                m.pid,
                m.key,
                m.ev_id,
                m.at,
                _side_out(m.side),
                _side_out(m.others),
                m.note,
                m.fresh,
                list(m.claiming),
            ]
        case ClaimOk():
            return [m.TAG, m.pid, m.key, m.ev_id, m.at, _side_out(m.side), m.note]
        case ClaimTaken():
            return [
                m.TAG,
                m.pid,
                m.key,
                m.owner,
                m.ev_id,
                m.at,
                _side_out(m.side),
                _side_out((m.ident,)),
                m.corr,
                m.note,
                _side_out(m.others),
            ]
        case ClaimGeneric():
            return [m.TAG, m.pid, m.key, m.ev_id, m.at, m.newly, m.note, m.rule, m.other]
        case MergeAsk():
            return [
                m.TAG,
                m.loser,
                m.winner,
                _side_out(m.side_l),
                _side_out(m.side_w),
                m.ev_id,
                m.at,
                m.corr,
                _side_out(m.others),
            ]
        case MergeOffer():
            return [
                m.TAG,
                m.winner,
                m.loser,
                m.state,
                _side_out(m.side_w),
                _side_out(m.side_l),
                m.ev_id,
                m.at,
                m.corr,
                _side_out(m.others),
            ]
        case MergeDone():
            return [m.TAG, m.loser, m.winner]
        case MergeNo():
            return [m.TAG, m.loser, m.winner, m.refusal]
        case Repoint():
            return [m.TAG, m.key, m.src, m.dst]
        case Release():
            return [m.TAG, m.key, m.pid, m.erase, list(m.srcs)]
        case Erase():
            return [m.TAG, m.key, m.pid, m.ev_id, m.at]
        case WeakSeen():
            return [m.TAG, m.key, m.owner, m.person, m.ev_id, m.at]
        case Split():
            return [m.TAG, m.pid, list(m.keys), m.reason, m.at, m.request]
        case Reassign():
            return [m.TAG, m.key, m.dst, list(m.srcs)]
        case Forget():
            return [m.TAG, m.partition, list(m.codes)]


def _from_obj(d: list[Any]) -> Msg:
    tag = d[0]
    if tag == Route.TAG:
        return Route(_ev_in(d[1]), tuple(d[2]), d[3])
    if tag == Apply.TAG:
        return Apply(d[1], _ev_in(d[2]), tuple(d[3]), d[4])
    if tag == Claim.TAG:
        claiming = tuple(d[9]) if len(d) > 9 else ()  # 0.3.1 and older: none
        return Claim(d[1], d[2], d[3], d[4], _side_in(d[5]), _others_in(d[6]), d[7], d[8], claiming)
    if tag == ClaimOk.TAG:
        return ClaimOk(d[1], d[2], d[3], d[4], _side_in(d[5]), d[6])
    if tag == ClaimTaken.TAG:
        others = _side_in(d[10]) if len(d) > 10 else ()  # 0.3.1 and older: none
        return ClaimTaken(d[1], d[2], d[3], d[4], d[5], _side_in(d[6]), _side_in(d[7])[0], d[8], d[9], others)
    if tag == ClaimGeneric.TAG:
        # 0.3.1 and older wrote no rule / other: their defaults (the last release's envelopes may be queued)
        return ClaimGeneric(*d[1:9])
    if tag == MergeAsk.TAG:
        others = _side_in(d[8]) if len(d) > 8 else ()
        return MergeAsk(d[1], d[2], _side_in(d[3]), _side_in(d[4]), d[5], d[6], d[7], others)
    if tag == MergeOffer.TAG:
        others = _side_in(d[9]) if len(d) > 9 else ()
        return MergeOffer(d[1], d[2], d[3], _side_in(d[4]), _side_in(d[5]), d[6], d[7], d[8], others)
    if tag == MergeDone.TAG:
        return MergeDone(d[1], d[2])
    if tag == MergeNo.TAG:
        return MergeNo(*d[1:4])  # 0.3.3 and older wrote no refusal
    if tag == Repoint.TAG:
        return Repoint(d[1], d[2], d[3])
    if tag == Release.TAG:
        return Release(d[1], d[2], d[3], tuple(d[4]) if len(d) > 4 else ())  # 0.4.1 and older: no srcs
    if tag == Erase.TAG:
        return Erase(d[1], d[2], d[3], d[4])
    if tag == WeakSeen.TAG:
        return WeakSeen(d[1], d[2], d[3], d[4], d[5])
    if tag == Split.TAG:
        return Split(d[1], tuple(d[2]), d[3], d[4], d[5])
    if tag == Reassign.TAG:
        return Reassign(d[1], d[2], tuple(d[3]))
    if tag == Forget.TAG:
        return Forget(d[1], tuple(d[2]))
    raise ValueError(f"unknown protocol message tag {tag!r}")


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return str(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def encode_msg(m: Msg) -> bytes:
    """One message as compact JSON (Decimals as strings, as the core stores revenue)."""
    return orjson.dumps(_to_obj(m), default=_default)


def decode_msg(raw: bytes) -> Msg:
    """Inverse of `encode_msg`."""
    return _from_obj(orjson.loads(raw))


def encode_envelopes(msgs: Sequence[Msg], most_bytes: int = ENVELOPE_MOST_BYTES) -> list[bytes]:
    """A batch's messages to one destination as internal records `{"v":2,"m":[msg, …]}`, in handling order.

    Usually one record; more when they would pass `most_bytes` (events of up to 1 MiB travel whole, so a
    batch's sends could pass any topic's record limit and fail the transaction on every retry). A message
    larger than `most_bytes` travels alone: one event, twice at most (attributes and envelope), fits the
    internal topic's limit.
    """
    whole = orjson.dumps({"v": ENVELOPE_VERSION, "m": [_to_obj(m) for m in msgs]}, default=_default)
    if len(whole) <= most_bytes:
        return [whole]
    out: list[bytes] = []
    parts: list[bytes] = []
    size = len(_ENVELOPE_HEAD) + len(_ENVELOPE_TAIL)
    for m in msgs:
        part = orjson.dumps(_to_obj(m), default=_default)
        if parts and size + 1 + len(part) > most_bytes:  # 1: the comma before it
            out.append(_envelope_of(parts))
            parts, size = [], len(_ENVELOPE_HEAD) + len(_ENVELOPE_TAIL)
        size += len(part) + (1 if parts else 0)
        parts.append(part)
    out.append(_envelope_of(parts))
    return out


# byte for byte what orjson writes for {"v": ENVELOPE_VERSION, "m": [...]}
_ENVELOPE_HEAD = b'{"v":%d,"m":[' % ENVELOPE_VERSION
_ENVELOPE_TAIL = b"]}"


def _envelope_of(parts: list[bytes]) -> bytes:
    return _ENVELOPE_HEAD + b",".join(parts) + _ENVELOPE_TAIL


class NewerEnvelope(RuntimeError):
    """An envelope of a later protocol version: a newer worker shares the group. Not bad input (the DLQ would
    lose messages a lock may wait for): the worker stops; upgrades stop every older worker first."""


def decode_envelope(raw: bytes) -> list[Msg]:
    """Inverse of `encode_envelopes`; ValueError on what is no envelope (or holds an unknown tag)."""
    d = orjson.loads(raw)
    version = d.get("v") if isinstance(d, dict) else None
    if isinstance(version, int) and version > ENVELOPE_VERSION:
        raise NewerEnvelope(f"protocol envelope v{version}; this worker reads v{ENVELOPE_VERSION}")
    if version not in _READABLE_VERSIONS or isinstance(version, bool):
        raise ValueError("not a protocol envelope")
    return [_from_obj(m) for m in d["m"]]


# ------------------------------------------------------------------------------------------------------------
# Rows (§2)
# ------------------------------------------------------------------------------------------------------------

TableName = Literal["ids", "profiles"]


# (table, key, value) of one changed row; a None value deletes it (a tombstone on the changelog)
Row = tuple[TableName, bytes, bytes | None]


class RowStore(Protocol):
    """Bytes rows of one partition: the Faust glue backs it with its tables, the simulator with dicts."""

    def get(self, table: TableName, key: bytes) -> bytes | None:
        """The committed-or-written value of a row, or None."""

    def keys(self, table: TableName, prefix: bytes) -> Iterable[bytes]:
        """The keys of the rows starting with `prefix`, in byte order (an erase's lookups, §7)."""

    def items(self, table: TableName, start: bytes) -> Iterable[tuple[bytes, bytes]]:
        """(key, value) of the rows from key `start` on, in key order, read lazily (indexing old registers
        a step at a time, §7)."""

    def write(self, rows: Sequence[Row]) -> None:
        """Write rows together, deleting those whose value is None: only rows of deferred messages and of
        the holders index are ever deleted (released registers and stubs stay)."""


class MemoryRowStore:
    """Dict-backed `RowStore`; `copy()` gives the simulator its committed snapshot."""

    def __init__(self, rows: dict[TableName, dict[bytes, bytes]] | None = None) -> None:
        self.rows: dict[TableName, dict[bytes, bytes]] = rows or {"ids": {}, "profiles": {}}

    def get(self, table: TableName, key: bytes) -> bytes | None:
        """Row value or None."""
        return self.rows[table].get(key)

    def keys(self, table: TableName, prefix: bytes) -> Iterable[bytes]:
        """Keys starting with `prefix`, sorted."""
        return sorted(key for key in self.rows[table] if key.startswith(prefix))

    def items(self, table: TableName, start: bytes) -> Iterable[tuple[bytes, bytes]]:
        """(key, value) of the rows from key `start` on, sorted by key."""
        rows = self.rows[table]
        return [(key, rows[key]) for key in sorted(rows) if key >= start]

    def write(self, rows: Sequence[Row]) -> None:
        """Write rows; delete those whose value is None."""
        for table, key, value in rows:
            if value is None:
                self.rows[table].pop(key, None)
            else:
                self.rows[table][key] = value

    def copy(self) -> MemoryRowStore:
        """Independent copy (values are immutable bytes)."""
        return MemoryRowStore({t: dict(r) for t, r in self.rows.items()})


class IdRow:
    """Identifier register: owner `p` (None = free/released), generic flag `g`, strong-neighbour codes."""

    __slots__ = ("g", "nb", "p")

    def __init__(self, p: str | None = None, g: bool = False, nb: list[int] | None = None) -> None:
        self.p = p
        self.g = g
        self.nb: list[int] = nb if nb is not None else []

    def encode(self) -> bytes:
        """orjson row value (doc §2 field names)."""
        return orjson.dumps({"p": self.p, "g": self.g, "nb": self.nb})

    @classmethod
    def decode(cls, raw: bytes) -> IdRow:
        """Inverse of `encode`."""
        d = orjson.loads(raw)
        return cls(d["p"], d["g"], d["nb"])


DEFERRED_INFIX = b"/q/"
HOLDERS_PREFIX = b"/nb/"
# `ids` row of indexing the registers written before the holders index existed (0.4.1 and older, §7): empty
# once every register of the partition is in the index, else the key of the register the next step starts at
INDEX_PROGRESS_KEY = b"/nb-indexed"
# `ids` row, while that indexing goes on: the codes erased meanwhile (an orjson list), which registers not
# indexed yet drop when read or reached
FORGOTTEN_WHILE_INDEXING_KEY = b"/nb-forgotten"
# Where that indexing starts: after every `/` key (the index's own rows), at the first register
FIRST_REGISTER_KEY = b"0"
# Registers indexed per flush: a partition of millions takes many batches, none of them long
INDEX_STEP_REGISTERS = 20_000


def holder_key(code: int, key: str) -> bytes:
    """The `ids` row saying that identifier `key`'s register holds neighbour `code` (identifier keys never
    start with `/`). One small row per pair: a list per code grew with every register a popular value was
    seen with."""
    return b"%s%d/%s" % (HOLDERS_PREFIX, code, key.encode())


def deferred_key(profile_id: str, seq: int) -> bytes:
    """The row of a profile's deferred message number `seq`, beside the profile's row (ids have no `/`)."""
    return b"%s%s%d" % (profile_id.encode(), DEFERRED_INFIX, seq)


def _missing(ranges: range, held: range) -> Iterator[int]:
    """The numbers of `ranges` outside `held` (both contiguous): at most a run below and a run above."""
    yield from range(ranges.start, min(ranges.stop, held.start))
    yield from range(max(ranges.start, held.stop), ranges.stop)


class Deferred:
    """A profile's deferred messages, FIFO (§5.3), numbered: the first waiting is number `head`.

    Each message waits in a row of its own (`deferred_key`), written once and deleted once handled, so the
    profile's row stays the size of its state however many events wait. Kept inline, a few events of up to
    1 MiB deferred during one merge made a row past the changelog's 8 MiB, and every commit of the partition
    failed again.
    """

    __slots__ = ("_msgs", "head", "stored")

    def __init__(self, msgs: Iterable[Msg] = (), head: int = 0, stored: range = range(0)) -> None:
        self._msgs: deque[Msg] = deque(msgs)
        self.head = head
        self.stored = stored  # the numbers the store holds rows for

    def __len__(self) -> int:
        return len(self._msgs)

    def __iter__(self) -> Iterator[Msg]:
        return iter(self._msgs)

    def first(self) -> Msg:
        """The message waiting longest."""
        return self._msgs[0]

    def append(self, m: Msg) -> None:
        """Defer `m` behind the others."""
        self._msgs.append(m)

    def popleft(self) -> Msg:
        """Take the message waiting longest."""
        self.head += 1
        return self._msgs.popleft()

    def take_all(self) -> list[Msg]:
        """Take every waiting message, in order."""
        taken = list(self._msgs)
        self._msgs.clear()
        self.head += len(taken)
        return taken

    def changed_rows(self, profile_id: str) -> list[Row]:
        """The message rows to write since `mark_stored`: new messages, and a delete for each one handled."""
        if not self._msgs and not self.stored:
            return []  # nearly every profile: no message waits, none did
        waiting = range(self.head, self.head + len(self._msgs))
        rows: list[Row] = [
            ("profiles", deferred_key(profile_id, n), None) for n in _missing(self.stored, waiting)
        ]
        rows.extend(
            ("profiles", deferred_key(profile_id, n), encode_msg(self._msgs[n - self.head]))
            for n in _missing(waiting, self.stored)
        )
        return rows

    def mark_stored(self) -> None:
        """The store now holds exactly the waiting messages' rows (`changed_rows` were written)."""
        if self._msgs or self.stored:
            self.stored = range(self.head, self.head + len(self._msgs))


class ProfileRow:
    """A profile's row: the core's state plus lock `lk`, claims in flight `cl`, deferred messages `q` (in
    rows of their own: the row keeps their numbers `qh`, `qn`), `ak`: event id → the profiles it asked to
    merge with for it, kept while the event has claims in flight, and `mv`: identifier → the profile a split
    moved it to (an erase that reaches P by a register not yet reassigned follows it there)."""

    __slots__ = ("ak", "cl", "lk", "mv", "q", "state")

    def __init__(
        self,
        state: ProfileState,
        lk: str | None = None,
        cl: dict[str, IdentRecord] | None = None,
        q: Deferred | None = None,
        ak: dict[str, list[str]] | None = None,
        mv: dict[str, str] | None = None,
    ) -> None:
        self.state = state
        self.lk = lk
        self.cl: dict[str, IdentRecord] = cl if cl is not None else {}
        self.q = q if q is not None else Deferred()
        self.ak: dict[str, list[str]] = ak if ak is not None else {}
        self.mv: dict[str, str] = mv if mv is not None else {}

    def encode(self) -> bytes:
        """`ProfileState.to_dict()` plus the protocol fields (only when set); the deferred messages' own
        rows come from `q.changed_rows`."""
        d = self.state.to_dict()
        if self.lk is not None:
            d["lk"] = self.lk
        if self.cl:
            d["cl"] = self.cl
        if self.q:
            d["qh"] = self.q.head
            d["qn"] = len(self.q)
        if self.ak:
            d["ak"] = self.ak
        if self.mv:
            d["mv"] = self.mv
        return orjson.dumps(d, default=_default)

    @classmethod
    def decode(cls, raw: bytes, read: Callable[[bytes], bytes | None] | None = None) -> ProfileRow:
        """Inverse of `encode`; `read` gets the deferred messages' rows from the profile's table."""
        d = orjson.loads(raw)
        lk = d.pop("lk", None)
        cl = d.pop("cl", None)
        ak = d.pop("ak", None)
        mv = d.pop("mv", None)
        head, count = d.pop("qh", 0), d.pop("qn", 0)
        # 0.4.1 and older kept the messages inline: they move to rows of their own at the row's next write
        q = Deferred(_from_obj(m) for m in d.pop("q", ()))
        state = ProfileState.from_dict(d)
        if count:
            if read is None:
                raise ValueError(f"profile {state.id} has {count} deferred messages: decode it with `read`")
            waiting = range(head, head + count)
            q = Deferred((decode_msg(_deferred_row(read, state.id, n)) for n in waiting), head, waiting)
        return cls(state, lk, cl, q, ak, mv)


def _deferred_row(read: Callable[[bytes], bytes | None], profile_id: str, seq: int) -> bytes:
    raw = read(deferred_key(profile_id, seq))
    if raw is None:
        raise ValueError(f"profile {profile_id}: deferred message {seq} has no row")
    return raw


class PartitionState:
    """The rows one partition owns, read through a two-generation hot cache; writes coalesce until `flush`.

    `flush()` writes every row changed since the last flush to the `RowStore` once and returns them, so the
    caller sends the same bytes to the changelog in the source partition's transaction (§8). After a crash or
    a rebalance, drop this object and build a new one over the store (the cache must not survive).
    """

    def __init__(
        self,
        partition: int,
        n: int,
        rules: Rules,
        store: RowStore | None = None,
        *,
        cache_rows: int = 100_000,
    ) -> None:
        self.partition = partition
        self.n = n
        self.rules = rules
        # the rules without the evidence rules (`_merge_offer` judges those as of the event's time)
        self.hard_rules = dataclasses.replace(
            rules, weak_cannot_bridge=False, verified_beats_unverified=False, corroborate_soft_bridges=False
        )
        self.store: RowStore = store if store is not None else MemoryRowStore()
        self._cache_rows = max(cache_rows, 1)
        self._ids_young: dict[str, IdRow] = {}
        self._ids_old: dict[str, IdRow] = {}
        self._p_young: dict[str, ProfileRow] = {}
        self._p_old: dict[str, ProfileRow] = {}
        self._dirty_ids: dict[str, IdRow] = {}
        self._dirty_p: dict[str, ProfileRow] = {}
        self._dirty_holders: dict[bytes, bool] = {}  # `holder_key` → held (written) or not (deleted)
        self._index_read = False  # `INDEX_PROGRESS_KEY` and `FORGOTTEN_WHILE_INDEXING_KEY` read
        self._index_next: bytes | None = None  # the next register to index; None once all are
        self._forgotten_while_indexing: set[int] = set()
        self._forgotten_stored = False  # `FORGOTTEN_WHILE_INDEXING_KEY` is in the store
        self._forgotten_changed = False

    # --- row interface ---------------------------------------------------------------------------------

    def get_id(self, key: str) -> IdRow | None:
        """The register of `key` (owned here), or None if never written."""
        row = self._ids_young.get(key)
        if row is None:
            row = self._ids_old.pop(key, None)
            if row is None:
                raw = self.store.get("ids", key.encode())
                if raw is None:
                    return None
                row = IdRow.decode(raw)
                if self._index_position() is not None and self._forgotten_while_indexing:
                    self._drop_stale(key, row, self._forgotten_while_indexing)
            self._ids_young[key] = row
        return row

    def put_id(self, key: str, row: IdRow) -> None:
        """Mark a register changed (written at the next flush)."""
        self._ids_young[key] = row
        self._dirty_ids[key] = row

    def get_profile(self, pid: str) -> ProfileRow | None:
        """The row of profile `pid` (homed here), or None."""
        row = self._p_young.get(pid)
        if row is None:
            row = self._p_old.pop(pid, None)
            if row is None:
                raw = self.store.get("profiles", pid.encode())
                if raw is None:
                    return None
                row = ProfileRow.decode(raw, self._read_profiles)
            self._p_young[pid] = row
        return row

    def put_profile(self, row: ProfileRow) -> None:
        """Mark a profile row changed (written at the next flush)."""
        pid = row.state.id
        self._p_young[pid] = row
        self._dirty_p[pid] = row

    def _read_profiles(self, key: bytes) -> bytes | None:
        return self.store.get("profiles", key)

    def holders(self, code: int) -> list[str]:
        """The identifiers whose registers here hold neighbour `code`: how an erase finds them (§7)."""
        prefix = b"%s%d/" % (HOLDERS_PREFIX, code)
        pairs = set(self.store.keys("ids", prefix))
        for pair, held in self._dirty_holders.items():
            if pair.startswith(prefix):
                if held:
                    pairs.add(pair)
                else:
                    pairs.discard(pair)
        return [pair[len(prefix) :].decode() for pair in sorted(pairs)]

    def hold(self, code: int, key: str) -> None:
        """Index that `key`'s register now holds `code` (written at the next flush)."""
        self._dirty_holders[holder_key(code, key)] = True

    def unhold(self, code: int, key: str) -> None:
        """Index that `key`'s register no longer holds `code` (deleted at the next flush)."""
        self._dirty_holders[holder_key(code, key)] = False

    def forget_unindexed(self, code: int) -> None:
        """An erased `code`, for the registers not indexed yet (§7), which `holders` does not find: those in
        the cache drop it now, the others when read or when the indexing reaches them."""
        if self._index_position() is not None and code not in self._forgotten_while_indexing:
            self._forgotten_while_indexing.add(code)
            self._forgotten_changed = True
            for cache in (self._ids_young, self._ids_old):
                for key, row in list(cache.items()):
                    if code in row.nb:
                        self._drop_stale(key, row, {code})

    def _drop_stale(self, key: str, row: IdRow, forgotten: set[int]) -> None:
        """Drop from `key`'s register the `forgotten` codes the holders index does not have: noted before
        the index existed. A pair it has was found by the `Forget`, or noted after it: left as it is."""
        stale = {c for c in row.nb if c in forgotten and not self._in_index(holder_key(c, key))}
        if stale:
            row.nb = [c for c in row.nb if c not in stale]
            self.put_id(key, row)

    def _in_index(self, pair: bytes) -> bool:
        """Whether the holders index has `pair`, or it was written or deleted since the last flush."""
        return pair in self._dirty_holders or self.store.get("ids", pair) is not None

    def flush(self) -> list[Row]:
        """Write each changed row once to the store; return them (table, key, value) for the changelog."""
        indexing = self._index_step()
        out: list[Row] = [("ids", k.encode(), r.encode()) for k, r in self._dirty_ids.items()]
        out.extend(("ids", pair, b"" if held else None) for pair, held in self._dirty_holders.items())
        out.extend(indexing)
        for pid, r in self._dirty_p.items():
            out.append(("profiles", pid.encode(), r.encode()))
            out.extend(r.q.changed_rows(pid))
        self.store.write(out)
        for r in self._dirty_p.values():
            r.q.mark_stored()
        self._dirty_ids.clear()
        self._dirty_p.clear()
        self._dirty_holders.clear()
        if len(self._p_young) > self._cache_rows:
            self._p_old, self._p_young = self._p_young, {}
        if len(self._ids_young) > 4 * self._cache_rows:
            self._ids_old, self._ids_young = self._ids_young, {}
        return out

    @property
    def holders_indexed(self) -> bool:
        """Whether every register of the partition is in the holders index (§7)."""
        return self._index_position() is None

    def _index_position(self) -> bytes | None:
        """The register the next indexing step starts at, None when the index is complete (read once)."""
        if not self._index_read:
            self._index_read = True
            progress = self.store.get("ids", INDEX_PROGRESS_KEY)
            self._index_next = FIRST_REGISTER_KEY if progress is None else progress or None
            forgotten = self.store.get("ids", FORGOTTEN_WHILE_INDEXING_KEY)
            self._forgotten_stored = forgotten is not None
            self._forgotten_while_indexing = set(orjson.loads(forgotten)) if forgotten else set()
        return self._index_next

    def _index_step(self) -> list[Row]:
        """Index up to `INDEX_STEP_REGISTERS` registers written before the holders index existed; the rows
        that record how far it got.

        Registers of 0.4.1 and older are not in the index, so an erase would leave the erased value's code
        in them (the core indexes an old state at its first erase, at once). A partition goes through its
        registers in key order, a step per flush, from where the last step stopped (also after a restart or
        a rebalance): each code not indexed yet gets its pair, or is dropped if it was erased meanwhile. A
        new partition has nothing to index and is complete at its first flush; a state of 0.4.2 or 0.4.3
        has its pairs already (looked up, not written again). A register changed since the last flush is
        read from the cache.
        """
        position = self._index_position()
        if position is None:
            return []
        stop = None
        for scanned, (key, raw) in enumerate(self.store.items("ids", position)):
            if scanned == INDEX_STEP_REGISTERS:
                stop = key
                break
            self._index_register(key.decode(), raw)
        self._index_next = stop
        rows: list[Row] = [("ids", INDEX_PROGRESS_KEY, b"" if stop is None else stop)]
        if stop is None:
            self._forgotten_while_indexing = set()
            if self._forgotten_stored:
                rows.append(("ids", FORGOTTEN_WHILE_INDEXING_KEY, None))
        elif self._forgotten_changed:
            rows.append(
                ("ids", FORGOTTEN_WHILE_INDEXING_KEY, orjson.dumps(sorted(self._forgotten_while_indexing)))
            )
            self._forgotten_stored = True
        self._forgotten_changed = False
        return rows

    def _index_register(self, key: str, raw: bytes) -> None:
        """Index the codes of one register that the index lacks, once those erased meanwhile are dropped."""
        row = self._ids_young.get(key) or self._ids_old.get(key) or IdRow.decode(raw)
        self._drop_stale(key, row, self._forgotten_while_indexing)
        for code in row.nb:
            pair = holder_key(code, key)
            if not is_people_code(code) and not self._in_index(pair):
                self._dirty_holders[pair] = True


# ------------------------------------------------------------------------------------------------------------
# Effects
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resolved:
    """An `events.resolved` record: the event and its profile at resolve time (None: no identifier)."""

    event: NormalizedEvent
    profile_id: str | None
    anchor: str | None


@dataclass(slots=True)
class Effects:
    """What handling produced; accumulate a whole batch of one source partition into one `Effects`.

    - `resolved`: one per event, in handling order;
    - `changes`: identity changes, `seq` per profile from the profile row;
    - `profiles`: profile ids (homed here) whose snapshot changed: publish one snapshot each (a tombstone
      when the profile is now merged or erased) after the batch;
    - `sends`: destination partition → messages, in handling order (one envelope per destination, or a few);
    - `dropped`: messages dropped on purpose, by reason (a metric, bounded labels).
    """

    resolved: list[Resolved] = field(default_factory=list)
    changes: list[IdentityChange] = field(default_factory=list)
    profiles: dict[str, None] = field(default_factory=dict)
    sends: dict[int, list[Msg]] = field(default_factory=dict)
    dropped: Counter[str] = field(default_factory=Counter)
    handled: int = 0


# ------------------------------------------------------------------------------------------------------------
# Handlers (§4, §5, §7)
# ------------------------------------------------------------------------------------------------------------


class _Ctx:
    """One `handle` call: the partition, its effects and the inline work queue."""

    __slots__ = ("fx", "st", "work")

    def __init__(self, st: PartitionState, fx: Effects) -> None:
        self.st = st
        self.fx = fx
        self.work: deque[Msg] = deque()

    def send(self, m: Msg) -> None:
        dest = destination(m, self.st.n)
        if dest == self.st.partition:
            self.work.append(m)
        else:
            self.fx.sends.setdefault(dest, []).append(m)

    def emit(
        self, row: ProfileRow, kind: ChangeKind, ev_id: str | None, at: int, payload: dict[str, Any]
    ) -> None:
        p = row.state
        p.seq += 1
        self.fx.changes.append(IdentityChange(kind, p.id, p.seq, ev_id, at, payload))
        self.touched(row)

    def touched(self, row: ProfileRow) -> None:
        """The profile's content changed: row write and snapshot."""
        self.st.put_profile(row)
        self.fx.profiles[row.state.id] = None


def ingest(st: PartitionState, ev: NormalizedEvent, fx: Effects | None = None) -> Effects:
    """Raw path (§4 step 0): route a validated event to its anchor's partition, inline when that is here."""
    fx = fx if fx is not None else Effects()
    keys = ordered_keys(ev, st.rules)
    if not keys:
        fx.resolved.append(Resolved(ev, None, None))
        return fx
    route = Route(ev, keys)
    dest = destination(route, st.n)
    if dest == st.partition:
        return handle(st, route, fx)
    fx.sends.setdefault(dest, []).append(route)
    return fx


def handle(st: PartitionState, msg: Msg, fx: Effects | None = None) -> Effects:
    """Handle one message addressed to this partition, and every message it causes here, to completion.

    Deterministic for a given row state and message, so re-processing an uncommitted input after a crash
    reproduces the same effects. Messages for other partitions end up in `fx.sends`.
    """
    fx = fx if fx is not None else Effects()
    ctx = _Ctx(st, fx)
    ctx.work.append(msg)
    while ctx.work:
        _dispatch(ctx, ctx.work.popleft(), from_queue=False)
    return fx


def _dispatch(ctx: _Ctx, m: Msg, *, from_queue: bool) -> None:
    ctx.fx.handled += 1
    match m:
        case Route():
            _route(ctx, m)
        case Claim():
            _claim(ctx, m)
        case Repoint():
            row = ctx.st.get_id(m.key)
            if row is not None and row.p == m.src:
                row.p = m.dst
                ctx.st.put_id(m.key, row)
        case Reassign():
            row = ctx.st.get_id(m.key)
            if row is not None and row.p in m.srcs:
                row.p = m.dst
                ctx.st.put_id(m.key, row)
            else:
                ctx.fx.dropped["reassign_stale"] += 1
        case Release():
            _release(ctx, m)
        case Erase() if m.pid is None:
            _erase_register(ctx, m)
        case WeakSeen():
            _weak_seen(ctx, m)
        case Forget():
            _forget(ctx, m)
        case _:
            _at_profile(ctx, m, from_queue=from_queue)


# --- registers -------------------------------------------------------------------------------------------


def _route(ctx: _Ctx, m: Route) -> None:
    st, ev = ctx.st, m.ev
    if ev.type == ERASE_TYPE:
        # the erase event resolves to no profile; each identifier's register is cleared at its partition
        ctx.fx.resolved.append(Resolved(ev, None, None))
        for key in m.keys:
            ctx.send(Erase(key, None, ev.event_id, ev.occurred_at_ms))
        return
    anchor = m.keys[0]
    row = st.get_id(anchor)
    if row is not None and row.g:
        rest = m.keys[1:]
        if rest:
            ctx.send(Route(ev, rest, m.dead))
        else:
            ctx.fx.resolved.append(Resolved(ev, None, None))
        return
    if row is not None and row.p is not None and row.p != m.dead:
        ctx.send(Apply(row.p, ev, m.keys))
        return
    # free (or held by an erased profile): the event starts a profile, born here (home == part(anchor))
    at = ev.occurred_at_ms
    pid = new_profile_id(ev.event_id, at, st.partition, st.n, lambda x: st.get_profile(x) is not None)
    p = ProfileState(pid, at)
    ident = next(i for i in ev.identifiers if i.key == anchor)
    p.add_identifier(anchor, [ident.type, at, at, ev.source, ident.verified, ev.event_id, pid, None])
    prow = ProfileRow(p)
    if row is None:
        row = IdRow()
    row.p = pid
    st.put_id(anchor, row)
    ctx.emit(prow, ChangeKind.CREATED, ev.event_id, at, {"identifiers": [anchor], "anchor": anchor})
    ctx.send(Apply(pid, ev, m.keys, fresh=True))


def _claim(ctx: _Ctx, m: Claim) -> None:
    st, rules = ctx.st, ctx.st.rules
    key = m.key
    row = st.get_id(key)
    if row is None:
        row = IdRow()
    if row.g:
        ctx.send(ClaimGeneric(m.pid, key, m.ev_id, m.at, False, m.note))
        return
    changed = False
    corr = False
    if rules.tracks_neighbours and _type_of(key) in rules.generic_types:
        nb = row.nb
        if nb and rules.corroborate_active:
            # evidence is a value pid already holds seen with this one before: what this same event claims
            # is either new (seen with nothing) or another profile's (no evidence about pid)
            corr = any(neighbour_code(i.key) in nb for i in m.side if i.key not in m.claiming)
        # strong neighbours seen across a profile boundary (core's `_track_generic`, from this register's
        # point of view: a free value sees all of them, a held one those not held by its owner)
        if row.p is None:
            src = [i.key for i in m.side] + [i.key for i in m.others]
        elif row.p == m.pid:
            src = [i.key for i in m.others]
        else:
            src = [i.key for i in m.side]
        gmax = rules.generic_max
        mark = rules.generic_active
        for other in src:
            t = _type_of(other)
            if other == key or t not in gmax:
                continue
            code = neighbour_code(other)
            if code not in nb:
                nb.append(code)
                st.hold(code, key)
                changed = True
            tag = code >> 32
            if mark and sum(1 for c in nb if c >> 32 == tag) > gmax[t]:
                row.g = True
                st.put_id(key, row)
                # the owner is the refusal's other profile, as in the core (None for a free value)
                ctx.send(ClaimGeneric(m.pid, key, m.ev_id, m.at, True, m.note, RULE_GENERIC, row.p))
                return
    if row.p is None:
        row.p = m.pid
        changed = True
    if changed:
        st.put_id(key, row)
    if row.p == m.pid:
        ctx.send(ClaimOk(m.pid, key, m.ev_id, m.at, m.side, m.note))
    else:
        ident, corr = _key_ident(key), corr or m.fresh
        ctx.send(ClaimTaken(m.pid, key, row.p, m.ev_id, m.at, m.side, ident, corr, m.note, m.others))


def _release(ctx: _Ctx, m: Release) -> None:
    row = ctx.st.get_id(m.key)
    if row is None:
        return
    if row.p == m.pid or row.p in m.srcs:
        row.p = None
        if m.erase:
            row.g = False
            _drop_neighbours(ctx.st, m.key, row)
        ctx.st.put_id(m.key, row)


def _weak_seen(ctx: _Ctx, m: WeakSeen) -> None:
    """Shared-device detection at the register (core's `_track_shared`): count the people; mark shared."""
    row = ctx.st.get_id(m.key)
    if row is None or row.g or row.p is None or row.p == m.person:
        return  # unknown, already not linking, released, or one person by now
    code = people_code(m.person)
    if code in row.nb:
        return
    row.nb.append(code)
    people = 1 + count_people(row.nb)  # the owner, and the others
    if people > ctx.st.rules.shared_max_people:
        row.g = True
        ctx.send(ClaimGeneric(m.person, m.key, m.ev_id, m.at, True, True, RULE_SHARED, row.p))
    ctx.st.put_id(m.key, row)


def _erase_register(ctx: _Ctx, m: Erase) -> None:
    # a value refused by every profile has no register, but the values claimed beside it noted its code
    _forget_everywhere(ctx, (m.key,))
    row = ctx.st.get_id(m.key)
    if row is None:
        return
    owner = row.p
    row.p, row.g = None, False
    _drop_neighbours(ctx.st, m.key, row)
    ctx.st.put_id(m.key, row)
    if owner is not None:
        ctx.send(Erase(m.key, owner, m.ev_id, m.at))


def _drop_neighbours(st: PartitionState, key: str, row: IdRow) -> None:
    """An erased register forgets whom it was seen with, and leaves the holders index of each."""
    for code in row.nb:
        if not is_people_code(code):  # people (§5.4) are not indexed
            st.unhold(code, key)
    row.nb = []


def _forget_everywhere(ctx: _Ctx, keys: Iterable[str]) -> None:
    """§7: every partition drops erased identifiers' codes from the registers that were seen with them."""
    codes = tuple(neighbour_code(key) for key in keys)
    for dest in range(ctx.st.n):
        ctx.send(Forget(dest, codes))


def _forget(ctx: _Ctx, m: Forget) -> None:
    st = ctx.st
    for code in m.codes:
        st.forget_unindexed(code)
        for key in st.holders(code):
            row = st.get_id(key)
            if row is not None and code in row.nb:
                row.nb.remove(code)
                st.put_id(key, row)
            st.unhold(code, key)


# --- profiles --------------------------------------------------------------------------------------------


def _target(m: Msg) -> str:
    match m:
        case Apply() | ClaimOk() | ClaimTaken() | ClaimGeneric():
            return m.pid
        case MergeAsk() | MergeDone() | MergeNo():
            return m.loser
        case MergeOffer():
            return m.winner
        case Erase():
            assert m.pid is not None
            return m.pid
        case Split():
            return m.pid
    raise TypeError(type(m).__name__)  # pragma: no cover


def _must_defer(row: ProfileRow, m: Msg, *, from_queue: bool) -> bool:
    """§5.3: a locked loser defers all but its merge reply; FIFO behind `q`; merges wait for claims."""
    if row.lk is not None:
        return not isinstance(m, MergeDone | MergeNo)
    if isinstance(m, Apply | MergeAsk | MergeOffer | Erase | Split) and row.q and not from_queue:
        return True
    # a split, like a merge, moves identifiers: not while the profile's claims are in flight
    return isinstance(m, MergeAsk | MergeOffer | Split) and bool(row.cl)


def _at_profile(ctx: _Ctx, m: Msg, *, from_queue: bool) -> None:
    pid = _target(m)
    row = ctx.st.get_profile(pid)
    if row is None:
        if isinstance(m, Apply):
            ctx.send(Route(m.ev, m.keys, pid))
        elif isinstance(m, Split):
            ctx.fx.dropped["split_refused"] += 1  # an operator's typo, not the fault `unknown_profile` counts
        else:
            ctx.fx.dropped["unknown_profile"] += 1
        return
    status = row.state.status
    if status == MERGED:
        _forward(ctx, row, m)
        return
    if status == ERASED:
        _at_erased(ctx, row, m)
        return
    if _must_defer(row, m, from_queue=from_queue):
        row.q.append(m)
        ctx.st.put_profile(row)
        return
    match m:
        case Apply():
            _apply(ctx, row, m)
        case ClaimOk():
            _claim_ok(ctx, row, m)
        case ClaimTaken():
            _claim_taken(ctx, row, m)
        case ClaimGeneric():
            _claim_generic(ctx, row, m)
        case MergeAsk():
            _merge_ask(ctx, row, m)
        case MergeOffer():
            _merge_offer(ctx, row, m)
        case MergeDone():
            _merge_done(ctx, row, m)
        case MergeNo():
            _merge_no(ctx, row, m)
        case Erase():
            _erase_profile(ctx, row, m)
        case Split():
            _split(ctx, row, m)
        case _:  # pragma: no cover
            raise TypeError(type(m).__name__)
    _drain(ctx, row)


def _drain(ctx: _Ctx, row: ProfileRow) -> None:
    """Re-process deferred messages in order while nothing blocks the head (a lock, a merge behind claims)."""
    while row.q and row.state.status == ACTIVE and not _must_defer(row, row.q.first(), from_queue=True):
        m = row.q.popleft()
        ctx.st.put_profile(row)
        _dispatch(ctx, m, from_queue=True)
    if row.q and row.state.status != ACTIVE:
        # erased (or merged) meanwhile: whatever waited follows §3 from here
        pending = row.q.take_all()
        ctx.st.put_profile(row)
        for m in pending:
            ctx.send(m)


def _forward(ctx: _Ctx, row: ProfileRow, m: Msg) -> None:
    """§3 forwarding rule: a merged stub re-sends to `into` (always a smaller id, so chains end)."""
    into = row.state.merged_into
    assert into is not None
    match m:
        case Apply():
            ctx.send(Apply(into, m.ev, m.keys))
        case ClaimOk():
            ctx.send(ClaimOk(into, m.key, m.ev_id, m.at, m.side, m.note))
        case ClaimTaken():
            ctx.send(
                ClaimTaken(into, m.key, m.owner, m.ev_id, m.at, m.side, m.ident, m.corr, m.note, m.others)
            )
        case ClaimGeneric():
            ctx.send(ClaimGeneric(into, m.key, m.ev_id, m.at, m.newly, m.note, m.rule, m.other))
        case MergeAsk():
            loser, winner, side_l, side_w = into, m.winner, m.side_l, m.side_w
            if loser == winner:
                ctx.fx.dropped["merge_already_done"] += 1
                return
            if loser < winner:
                loser, winner, side_l, side_w = winner, loser, side_w, side_l
            ctx.send(MergeAsk(loser, winner, side_l, side_w, m.ev_id, m.at, m.corr, m.others))
        case MergeOffer():
            ctx.send(MergeOffer(into, m.loser, m.state, m.side_w, m.side_l, m.ev_id, m.at, m.corr, m.others))
        case MergeDone() | MergeNo():
            ctx.fx.dropped["reply_at_stub"] += 1  # idempotent: the merge already completed
        case Erase():
            # an identifier a split moved out before the merge is the split-off profile's to erase (§7b)
            ctx.send(Erase(m.key, row.mv.get(m.key, into), m.ev_id, m.at))
        case Split():
            ctx.send(Split(into, m.keys, m.reason, m.at, m.request))
        case _:  # pragma: no cover
            raise TypeError(type(m).__name__)


def _at_erased(ctx: _Ctx, row: ProfileRow, m: Msg) -> None:
    """§3: an erased profile turns `Apply` into a new profile, `ClaimOk` into an erasing `Release`,
    `MergeOffer` into `MergeNo`, and an `Erase` of an identifier a split moved out into the split-off
    profile's; the rest is dropped."""
    match m:
        case Apply():
            ctx.send(Route(m.ev, m.keys, row.state.id))
        case ClaimOk() if not m.note:
            # claimed for an event before the erase: the value goes as the profile's other values went
            ctx.send(Release(m.key, row.state.id, True))
            _forget_everywhere(ctx, (m.key,))
        case MergeOffer():
            # the loser is locked waiting for an answer: refuse rather than drop (design doc change)
            ctx.send(MergeNo(m.loser, m.winner))
        case Erase() if m.key in row.mv:
            # a split moved the identifier out before the erase (§7b): the split-off profile holds it
            ctx.send(Erase(m.key, row.mv[m.key], m.ev_id, m.at))
        case _:
            ctx.fx.dropped["erased_profile"] += 1


class _View:
    """`view(P)`: P with its claims in flight counted as present, for `check_attach` (§4 step 2c)."""

    __slots__ = ("added", "p")

    def __init__(self, p: ProfileState, cl: dict[str, IdentRecord]) -> None:
        self.p = p
        self.added: list[str] = []
        for k, rec in cl.items():
            self.add(k, rec)

    def add(self, key: str, rec: IdentRecord) -> None:
        self.p.add_identifier(key, rec)
        self.added.append(key)

    def close(self) -> None:
        for k in self.added:
            self.p.remove_identifier(k)


def _ident(ev: NormalizedEvent, key: str) -> Identifier:
    for i in ev.identifiers:
        if i.key == key:
            return i
    raise KeyError(key)  # pragma: no cover - keys come from the event


def _apply(ctx: _Ctx, row: ProfileRow, m: Apply) -> None:
    p, ev, rules = row.state, m.ev, ctx.st.rules
    at, ev_id = ev.occurred_at_ms, ev.event_id
    # step "resolve": exactly once per event (only a non-forwarded, non-deferred Apply gets here)
    ctx.fx.resolved.append(Resolved(ev, p.id, m.keys[0]))
    # step "touch" + "aggregate"
    ids = p.ids
    held = [k for k in m.keys if k in ids]
    for k in held:
        held_rec = ids[k]
        if at > held_rec[R_LAST]:
            held_rec[R_LAST] = at
        if at < held_rec[R_FIRST]:  # events arrive out of event-time order: first seen is the earliest
            held_rec[R_FIRST] = at
        if not held_rec[R_VERIFIED] and _ident(ev, k).verified:
            held_rec[R_VERIFIED] = True
    p.record_event(ev)
    ctx.touched(row)
    if len(held) == len(m.keys):  # the common event: every identifier held already, nothing to claim or note
        return
    # step "claim": every identifier not held nor in flight, in priority order, as check_attach allows
    held_set = set(held)
    claims: list[tuple[str, tuple[Identifier, ...]]] = []
    refusals: list[tuple[str, Refusal]] = []
    claiming: list[str] = []  # in priority order, so a claim's `claiming` is those claimed before it
    if any(k not in held_set and k not in row.cl for k in m.keys):  # most events bring nothing new
        side: list[Identifier] = []
        view = _View(p, row.cl)
        try:
            for k in m.keys:
                ident = _ident(ev, k)
                if k in held_set or k in row.cl:
                    side.append(ident)
                    continue
                refusal = check_attach(p, ident, rules, at)
                if refusal is not None:
                    refusals.append((k, refusal))
                    continue
                rec: IdentRecord = [ident.type, at, at, ev.source, ident.verified, ev_id, p.id, None]
                row.cl[k] = rec
                view.add(k, rec)
                claims.append((k, tuple(side)))
                side.append(ident)
                claiming.append(k)
        finally:
            view.close()
    for k, refusal in refusals:
        ctx.emit(
            row,
            ChangeKind.REFUSED,
            ev_id,
            at,
            {"rule": refusal.rule, "detail": refusal.detail, "identifiers": [k], "other_profile_id": None},
        )
    for n, (k, bridge) in enumerate(claims):
        bridge_keys = {i.key for i in bridge}
        others = tuple(_ident(ev, x) for x in m.keys if x != k and x not in bridge_keys)
        ctx.send(Claim(p.id, k, ev_id, at, bridge, others, False, m.fresh, tuple(claiming[:n])))
    # step "notes": held soft values seen with strong values from outside P feed generic detection
    if rules.tracks_neighbours and len(m.keys) > 1:
        outside = tuple(_ident(ev, x) for x in m.keys if x not in held_set)
        if any(i.type in rules.generic_max for i in outside):
            for k in held:
                if _type_of(k) in rules.generic_types:
                    rest = tuple(_ident(ev, x) for x in held if x != k)
                    ctx.send(Claim(p.id, k, ev_id, at, rest, outside, True, False))
    if claims:
        ctx.st.put_profile(row)


def _claim_ok(ctx: _Ctx, row: ProfileRow, m: ClaimOk) -> None:
    p = row.state
    rec = row.cl.pop(m.key, None)
    if rec is None:
        if m.key not in p.ids and not m.note:
            ctx.send(Release(m.key, p.id))  # the register names P but P does not hold it: undo
        return
    p.add_identifier(m.key, rec)
    ctx.emit(
        row, ChangeKind.ATTACHED, m.ev_id, m.at, {"identifier": m.key, "bridge": [i.key for i in m.side]}
    )
    _forget_answered(ctx, row, m.ev_id)


def _claim_generic(ctx: _Ctx, row: ProfileRow, m: ClaimGeneric) -> None:
    if row.cl.pop(m.key, None) is not None:
        ctx.st.put_profile(row)
        _forget_answered(ctx, row, m.ev_id)
    if m.newly:
        detail = (
            "weak value seen with person identifiers of several profiles"
            if m.rule == RULE_SHARED
            else "value seen with too many distinct strong identifiers"
        )
        ctx.emit(
            row,
            ChangeKind.REFUSED,
            m.ev_id,
            m.at,
            {"rule": m.rule, "detail": detail, "identifiers": [m.key], "other_profile_id": m.other},
        )


def _claim_taken(ctx: _Ctx, row: ProfileRow, m: ClaimTaken) -> None:
    p = row.state
    rec = row.cl.pop(m.key, None)
    ident = m.ident
    if rec is not None:
        ctx.st.put_profile(row)
        # the register knows the value only; whether this event verified it is in our reservation
        ident = Identifier(ident.type, ident.value, bool(rec[R_VERIFIED]))
    q = m.owner
    asked = row.ak.get(m.ev_id, [])
    _forget_answered(ctx, row, m.ev_id)
    if q == p.id or q in p.merged_from:
        return  # already one profile
    if q in asked:
        # the event claimed another identifier of q too: its merge ask carried all of the event's identifiers,
        # and the core judges an event once per profile (a second ask would only repeat a refusal)
        ctx.fx.dropped["merge_already_asked"] += 1
        return
    if _claims_in_flight(row, m.ev_id):
        row.ak[m.ev_id] = [*asked, q]
        ctx.st.put_profile(row)
    side_p, side_q = m.side, (ident,)
    if p.id > q:
        ctx.send(MergeAsk(p.id, q, side_p, side_q, m.ev_id, m.at, m.corr, m.others))
    else:
        ctx.send(MergeAsk(q, p.id, side_q, side_p, m.ev_id, m.at, m.corr, m.others))


def _claims_in_flight(row: ProfileRow, ev_id: str) -> bool:
    """Whether claims `ev_id` made are still unanswered (a reservation records the event that made it)."""
    return any(rec[R_VIA] == ev_id for rec in row.cl.values())


def _forget_answered(ctx: _Ctx, row: ProfileRow, ev_id: str) -> None:
    """Drop the event's merge asks once its last claim is answered: no reply of that event can follow."""
    if ev_id in row.ak and not _claims_in_flight(row, ev_id):
        del row.ak[ev_id]
        ctx.st.put_profile(row)


def _merge_ask(ctx: _Ctx, row: ProfileRow, m: MergeAsk) -> None:
    p = row.state
    if m.winner == p.id or m.winner in p.merged_from:
        ctx.fx.dropped["merge_already_done"] += 1
        return
    row.lk = m.winner
    ctx.st.put_profile(row)
    # a JSON round trip: the offer must not share mutable parts with the row (inline delivery)
    state = orjson.loads(orjson.dumps(p.to_dict(), default=_default))
    ctx.send(MergeOffer(m.winner, p.id, state, m.side_w, m.side_l, m.ev_id, m.at, m.corr, m.others))


def _merge_offer(ctx: _Ctx, row: ProfileRow, m: MergeOffer) -> None:
    w = row.state
    if m.loser in w.merged_from:
        ctx.send(MergeDone(m.loser, w.id))  # idempotent re-offer
        return
    loser = ProfileState.from_dict(m.state)
    # the event's identifiers each profile holds now (both states are exact): the core judges all of an
    # event's identifiers of the other profile together, so one unverified or weak claim alone is not the
    # whole bridge when the same event brings more of that profile
    event = (*m.side_w, *m.side_l, *m.others)
    side_w = _held(w, event) or m.side_w
    side_l = _held(loser, event) or m.side_l
    refusal = _judge_merge(ctx.st, w, loser, side_w, side_l, m)
    if refusal is not None:
        rules = ctx.st.rules
        rank = rules.rank
        # the event's profile holds its highest-priority identifier (its anchor, as in the core); the core
        # pins the refusal there and names the event's identifiers the other profile keeps
        winner_is_event = not side_l or (bool(side_w) and _best(side_w, rank) < _best(side_l, rank))
        refused = side_l if winner_is_event else side_w
        payload = {
            "rule": refusal.rule,
            "detail": refusal.detail,
            "identifiers": sorted({i.key for i in refused}),
            "other_profile_id": loser.id if winner_is_event else w.id,
        }
        if winner_is_event:
            ctx.emit(row, ChangeKind.REFUSED, m.ev_id, m.at, payload)
            ctx.send(MergeNo(m.loser, w.id))
        else:
            ctx.send(MergeNo(m.loser, w.id, {"ev_id": m.ev_id, "at": m.at, "payload": payload}))
        if rules.shared_active and side_w and side_l:
            if winner_is_event:
                _weak_sightings(ctx, loser, side_l, w.id, side_w, m.ev_id, m.at)
            else:
                _weak_sightings(ctx, w, side_w, loser.id, side_l, m.ev_id, m.at)
        return
    moved = sorted(loser.ids)
    w.absorb(loser)
    # the event saw its identifiers at its time, maybe before the profile that held them, and maybe verified
    # (the core's step "touch"; `_apply` touched only what the event's profile held already)
    for ident in (*side_w, *side_l):
        rec = w.ids.get(ident.key)
        if rec is not None:
            if m.at < rec[R_FIRST]:
                rec[R_FIRST] = m.at
            if m.at > rec[R_LAST]:
                rec[R_LAST] = m.at
            if ident.verified and not rec[R_VERIFIED]:
                rec[R_VERIFIED] = True
    ctx.emit(
        row,
        ChangeKind.MERGED,
        m.ev_id,
        m.at,
        {
            "merged_profile_id": loser.id,
            "identifiers_moved": moved,
            "bridge": [i.key for i in side_w],
            "bridge_other": [i.key for i in side_l],
        },
    )
    ctx.send(MergeDone(m.loser, w.id))


_EVIDENCE_RULES = frozenset({RULE_WEAK_BRIDGE, RULE_UNVERIFIED_BRIDGE, RULE_UNCORROBORATED})


def _judge_merge(
    st: PartitionState,
    w: ProfileState,
    loser: ProfileState,
    side_w: tuple[Identifier, ...],
    side_l: tuple[Identifier, ...],
    m: MergeOffer,
) -> Refusal | None:
    """`check_merge` on both exact states, with the evidence rules judged as of the event's time.

    Events reach the protocol out of event-time order (other raw partitions, other hops); the replay judges
    each one on what the profiles knew by its time. So the evidence rules see each profile as of the event's
    time, and the hard ones (unique ids, limits, size cap, `apart`) judge the whole state.
    """
    _refresh_apart(w, loser)
    _refresh_apart(loser, w)
    refusal = check_merge(w, loser, side_w, side_l, st.rules, m.at, corroborated=m.corr)
    if refusal is None or refusal.rule not in _EVIDENCE_RULES:
        return refusal
    w_then, loser_then = _as_of(w, m.at), _as_of(loser, m.at)
    if w_then is w and loser_then is loser:
        return refusal
    refusal = check_merge(w_then, loser_then, side_w, side_l, st.rules, m.at, corroborated=m.corr)
    if refusal is not None:
        return refusal
    return check_merge(w, loser, side_w, side_l, st.hard_rules, m.at)


def _as_of(p: ProfileState, at: int) -> ProfileState:
    """`p` holding only the identifiers first seen by `at` (itself when that is all of them)."""
    if all(rec[R_FIRST] <= at for rec in p.ids.values()):
        return p
    then = ProfileState(p.id, p.created_ms)
    for key, rec in p.ids.items():
        if rec[R_FIRST] <= at:
            then.add_identifier(key, rec)
    return then


def _held(p: ProfileState, event: tuple[Identifier, ...]) -> tuple[Identifier, ...]:
    """The event's identifiers `p` holds, once each, in the event's order."""
    held: dict[str, Identifier] = {}
    for ident in event:
        if ident.key in p.ids and ident.key not in held:
            held[ident.key] = ident
    return tuple(held.values())


def _best(side: tuple[Identifier, ...], rank: Mapping[str, int]) -> tuple[int, str]:
    """The side's highest-priority identifier as the core orders them: (rank, key)."""
    return min((rank.get(i.type, len(rank)), i.key) for i in side)


def _weak_sightings(
    ctx: _Ctx,
    holder: ProfileState,
    side: tuple[Identifier, ...],
    person: str,
    person_side: tuple[Identifier, ...],
    ev_id: str,
    at: int,
) -> None:
    """A refused merge leaves weak values of the event in `holder`, not in the event's profile `person`: if
    both are people (hold person identifiers), each of those values was seen with one more person."""
    rules = ctx.st.rules
    ptypes = rules.shared_person_types
    if not holder.has_type_in(ptypes) or not any(i.type in ptypes for i in person_side):
        return
    for ident in side:
        if ident.type in rules.shared_types:
            ctx.send(WeakSeen(ident.key, holder.id, person, ev_id, at))


def _merge_done(ctx: _Ctx, row: ProfileRow, m: MergeDone) -> None:
    p = row.state
    if row.lk is None:
        ctx.fx.dropped["unexpected_merge_reply"] += 1
        return
    moved = sorted(p.ids)
    p.status = MERGED
    p.merged_into = m.winner
    p.ids = {}
    p.types = {}
    row.lk = None
    row.ak = {}  # replies to its claims are forwarded to the winner from now on
    ctx.touched(row)  # snapshot → tombstone
    for key in moved:
        ctx.send(Repoint(key, p.id, m.winner))
    for deferred in row.q.take_all():
        _forward(ctx, row, deferred)


def _split(ctx: _Ctx, row: ProfileRow, m: Split) -> None:
    """The core's `split`: the identifiers (and so their future events) move to a new profile, born here,
    kept apart from this one for good. A request the core would refuse is dropped, counted."""
    p = row.state
    keys = sorted(set(m.keys))
    if not keys or len(keys) == len(p.ids) or any(k not in p.ids for k in keys):
        ctx.fx.dropped["split_refused"] += 1
        return
    st = ctx.st
    nid = new_profile_id(
        f"split:{p.id}:{p.seq}", m.at, st.partition, st.n, lambda x: st.get_profile(x) is not None
    )
    n = ProfileState(nid, m.at)
    n.split_from = p.id
    for key in keys:
        rec = p.remove_identifier(key)
        assert rec is not None
        rec[R_ORIGIN] = nid
        rec[R_VIA] = f"split:{p.id}"
        n.add_identifier(key, rec)
        row.mv[key] = nid
        ctx.send(Reassign(key, nid, (p.id, *p.merged_from)))
    n.apart = (p.id,)
    p.apart = (*p.apart, nid)
    ctx.emit(
        row,
        ChangeKind.SPLIT,
        m.request,
        m.at,
        {"split_profile_id": nid, "identifiers": keys, "reason": m.reason},
    )
    ctx.emit(
        ProfileRow(n),
        ChangeKind.CREATED,
        m.request,
        m.at,
        {"identifiers": keys, "split_from": p.id, "reason": m.reason},
    )


def _refresh_apart(p: ProfileState, other: ProfileState) -> None:
    """Ids `p` was split apart from that `other` has absorbed since stand for `other` now: the core maps
    `apart` to live profiles, and the one being judged is the live one they lead to here."""
    if p.apart and other.merged_from:
        absorbed = set(other.merged_from)
        p.apart = tuple(dict.fromkeys(other.id if x in absorbed else x for x in p.apart))


def _merge_no(ctx: _Ctx, row: ProfileRow, m: MergeNo) -> None:
    if row.lk is None:
        ctx.fx.dropped["unexpected_merge_reply"] += 1
        return
    row.lk = None
    ctx.st.put_profile(row)  # `_drain` runs next
    if m.refusal is not None:
        ctx.emit(row, ChangeKind.REFUSED, m.refusal["ev_id"], m.refusal["at"], m.refusal["payload"])


def _erase_profile(ctx: _Ctx, row: ProfileRow, m: Erase) -> None:
    p = row.state
    if m.key not in p.ids:
        # the register named P, but a split moved the identifier on meanwhile: the erase is its new profile's
        moved = row.mv.get(m.key)
        if moved is not None:
            ctx.send(Erase(m.key, moved, m.ev_id, m.at))
        else:
            ctx.fx.dropped["erase_not_held"] += 1
        return
    keys = sorted(p.ids)
    absorbed = p.merged_from
    p.wipe(ERASED)
    row.cl = {}  # replies to claims in flight turn into Release at the erased row (§3)
    row.ak = {}
    p.seq += 1
    ctx.fx.changes.append(IdentityChange(ChangeKind.ERASED, p.id, p.seq, m.ev_id, m.at, {}))
    ctx.touched(row)
    for key in keys:
        ctx.send(Release(key, p.id, True, absorbed))
    _forget_everywhere(ctx, keys)
