"""Profile state: the per-profile summary the rules judge and the stream app publishes as a snapshot.

Kept as one mutable slotted object per profile (no per-event allocation on the hot path) with a compact
orjson encoding; identifier records are small lists indexed by the `R_*` constants.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from streams.events import NormalizedEvent

try:  # the packed row's codec in Rust (native/src/state.rs), when `make setup` built it
    from omnistitch_native import profile_json as _row_to_json
    from omnistitch_native import profile_row as _native_row
except ImportError:  # not built: `_pack_row` / `_unpack_row` below, the same bytes
    _row_to_json = None  # type: ignore[assignment]
    _native_row = None  # type: ignore[assignment]

__all__ = [
    "ACTIVE",
    "ERASED",
    "MERGED",
    "ORDER_TYPES",
    "ROW_FORMAT",
    "R_FIRST",
    "R_LAST",
    "R_NB",
    "R_ORIGIN",
    "R_SOURCE",
    "R_TYPE",
    "R_VERIFIED",
    "R_VIA",
    "IdentRecord",
    "ProfileState",
    "count_people",
    "is_people_code",
    "neighbour_code",
    "people_code",
]

# Event types whose `total` counts as an order and revenue on the person's profile.
ORDER_TYPES = frozenset({"order_placed", "store_purchase"})

ACTIVE = "active"
MERGED = "merged"
ERASED = "erased"

# Identifier record layout: [type, first_seen_ms, last_seen_ms, source, verified, via_event_id,
#                            origin_profile_id, neighbours {strong type: [crc32, ...]} | None]
R_TYPE, R_FIRST, R_LAST, R_SOURCE, R_VERIFIED, R_VIA, R_ORIGIN, R_NB = range(8)
IdentRecord = list[Any]

# first element of `ProfileState.positional_json`: a live profile, or a merged / erased tombstone
_ENC_ACTIVE = 1
_ENC_TOMBSTONE = 0
# first byte of a packed profile row (`ProfileState.encode`); JSON rows start with `[` or `{`
ROW_FORMAT = b"\x01"


def neighbour_code(key: str) -> int:
    """An identifier key as a 48-bit code: 16-bit tag of its type, crc32 of the key (no raw value kept).

    Generic-value and corroboration tracking remember neighbours by this code, in the core and in the
    partitioned protocol alike, so both must compute it the same way.
    """
    return ((zlib.crc32(key.partition(":")[0].encode()) & 0xFFFF) << 32) | zlib.crc32(key.encode())


# neighbour codes with this tag are "people" a weak value was seen with (shared-device detection): above the
# 16 bits of a type tag, so generic counts and corroboration, which compare type tags and identifier codes,
# never mistake one for an identifier
_PEOPLE_TAG = 1 << 16


def people_code(profile_id: str) -> int:
    """A profile a weak value was seen with, as a neighbour code: the tag, crc32 of the profile id."""
    return (_PEOPLE_TAG << 32) | zlib.crc32(profile_id.encode())


def is_people_code(code: int) -> bool:
    """Whether a neighbour code is a `people_code` (not an identifier's)."""
    return code >> 32 == _PEOPLE_TAG


def count_people(codes: list[int]) -> int:
    """How many `people_code`s a neighbour list holds."""
    return sum(1 for c in codes if is_people_code(c))


class ProfileState:
    """One profile: status, identifiers with provenance, and activity aggregates.

    Aggregates: events, orders, revenue per currency (Decimal in memory, string on disk), channels and
    sources seen (count, last seen), first/last activity; `extra` is free for further aggregators.
    """

    __slots__ = (
        "apart",
        "channels",
        "created_ms",
        "events",
        "extra",
        "first_ms",
        "id",
        "ids",
        "last_ms",
        "merged_from",
        "merged_into",
        "orders",
        "revenue",
        "seq",
        "sources",
        "split_from",
        "status",
        "types",
    )

    def __init__(self, profile_id: str, created_ms: int) -> None:
        self.id = profile_id
        self.status = ACTIVE
        self.merged_into: str | None = None
        self.seq = 0
        self.created_ms = created_ms
        self.first_ms = created_ms
        self.last_ms = created_ms
        self.events = 0
        self.orders = 0
        self.revenue: dict[str, Decimal] = {}
        self.channels: dict[str, list[int]] = {}
        self.sources: dict[str, list[int]] = {}
        self.ids: dict[str, IdentRecord] = {}
        self.types: dict[str, int] = {}
        self.apart: tuple[str, ...] = ()  # tuples: most profiles never need them, () is shared
        self.merged_from: tuple[str, ...] = ()
        self.split_from: str | None = None
        self.extra: dict[str, Any] = {}

    def record_event(self, ev: NormalizedEvent) -> None:
        """Fold one event into the aggregates: events, activity window, channels, sources, orders.

        An order's revenue sum comes first: one that raises (decimal's Overflow) leaves the profile as it was,
        so a failed link leaves no half-counted event behind, in this graph or the native engine.
        """
        at = ev.occurred_at_ms
        is_order = ev.type in ORDER_TYPES
        revenue = self._order_revenue(ev.attributes) if is_order else None
        self.events += 1
        if at > self.last_ms:
            self.last_ms = at
        if at < self.first_ms:
            self.first_ms = at
        # unrolled for channels and sources: this runs for every event (the hot path)
        slot = self.channels.get(ev.channel)
        if slot is None:
            self.channels[ev.channel] = [1, at]
        else:
            slot[0] += 1
            if at > slot[1]:
                slot[1] = at
        slot = self.sources.get(ev.source)
        if slot is None:
            self.sources[ev.source] = [1, at]
        else:
            slot[0] += 1
            if at > slot[1]:
                slot[1] = at
        if is_order:
            self.orders += 1
            if revenue is not None:
                self.revenue[revenue[0]] = revenue[1]

    def _order_revenue(self, attrs: Mapping[str, Any]) -> tuple[str, Decimal] | None:
        """(currency, its revenue with this order's total), or None for an order without a usable total."""
        total = attrs.get("total")
        if total is None:
            return None
        try:
            amount = total if isinstance(total, Decimal) else Decimal(str(total))
        except InvalidOperation:
            return None
        currency = str(attrs.get("currency") or "XXX")
        return currency, self.revenue.get(currency, Decimal(0)) + amount

    def wipe(self, status: str) -> None:
        """Drop every identifier and aggregate (erase), keeping id and seq."""
        seq = self.seq
        self.__init__(self.id, 0)  # type: ignore[misc]
        self.status = status
        self.seq = seq

    # --- identifiers -------------------------------------------------------------------------------

    def add_identifier(self, key: str, record: IdentRecord) -> None:
        """Attach one identifier record (caller has checked the rules)."""
        self.ids[key] = record
        t = record[R_TYPE]
        self.types[t] = self.types.get(t, 0) + 1

    def remove_identifier(self, key: str) -> IdentRecord | None:
        """Detach one identifier, returning its record."""
        record = self.ids.pop(key, None)
        if record is not None:
            t = record[R_TYPE]
            n = self.types.get(t, 0) - 1
            if n > 0:
                self.types[t] = n
            else:
                self.types.pop(t, None)
        return record

    def count_type(self, id_type: str, since_ms: int | None = None) -> int:
        """Distinct identifiers of `id_type`; with `since_ms`, only those seen at or after it."""
        if since_ms is None:
            return self.types.get(id_type, 0)
        return sum(1 for r in self.ids.values() if r[R_TYPE] == id_type and r[R_LAST] >= since_ms)

    def has_type_in(self, types: frozenset[str]) -> bool:
        """Whether the profile holds any identifier of one of `types`."""
        return any(t in types for t in self.types)

    def has_verified(self) -> bool:
        """Whether any held identifier has been seen verified."""
        return any(r[R_VERIFIED] for r in self.ids.values())

    def identifiers_by_type(self) -> dict[str, list[str]]:
        """Identifier keys grouped by type, sorted: the snapshot view."""
        out: dict[str, list[str]] = {}
        for key in sorted(self.ids):
            out.setdefault(self.ids[key][R_TYPE], []).append(key)
        return out

    # --- aggregates --------------------------------------------------------------------------------

    def absorb(self, other: ProfileState) -> None:
        """Fold `other`'s identifiers and aggregates into this profile (merge; `other` is the loser).

        The revenue sums come first: one that raises (decimal's Overflow) leaves both profiles as they were.
        """
        revenue = dict(self.revenue)
        for cur, amount in other.revenue.items():
            revenue[cur] = revenue.get(cur, Decimal(0)) + amount
        for key, record in other.ids.items():
            self.add_identifier(key, record)
        self.first_ms = min(self.first_ms, other.first_ms)
        self.last_ms = max(self.last_ms, other.last_ms)
        self.events += other.events
        self.orders += other.orders
        self.revenue = revenue
        for mine, theirs in ((self.channels, other.channels), (self.sources, other.sources)):
            for name, (count, last) in theirs.items():
                slot = mine.get(name)
                if slot is None:
                    mine[name] = [count, last]
                else:
                    slot[0] += count
                    if last > slot[1]:
                        slot[1] = last
        if other.apart:
            self.apart = (*self.apart, *(pid for pid in other.apart if pid not in self.apart))
        self.merged_from = (*self.merged_from, *other.merged_from, other.id)
        for k, v in other.extra.items():
            self.extra.setdefault(k, v)

    # --- encoding ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (revenue as strings): storage and snapshots."""
        if self.status != ACTIVE:
            return {"id": self.id, "st": self.status, "into": self.merged_into, "seq": self.seq}
        return {
            "id": self.id,
            "st": self.status,
            "seq": self.seq,
            "c": self.created_ms,
            "f": self.first_ms,
            "l": self.last_ms,
            "ev": self.events,
            "o": self.orders,
            "rev": {k: str(v) for k, v in self.revenue.items()},
            "ch": self.channels,
            "src": self.sources,
            "ids": self.ids,
            "ap": self.apart,
            "mf": self.merged_from,
            "sf": self.split_from,
            "x": self.extra,
        }

    def encode(self) -> bytes:
        """The stored row, also the Python graph's cold cache entry: the packed form (`_pack_row`).

        About half the positional JSON below, which was the row until 0.4.4: a flush writes and RocksDB
        compacts that much less. With the native module built, its codec packs it (the same bytes, about
        four times faster than packing in Python).
        """
        if _native_row is not None:
            try:
                return _native_row(self)
            except ValueError:  # `extra` nested deeper than serde_json reads (128 levels): same bytes here
                pass
        return _pack_row(self)

    def positional_json(self) -> bytes:
        """A positional array, no key names: the row until 0.4.4 (still read).

        About a third smaller and faster both ways than the `to_dict` form (which `decode` still reads).
        """
        if self.status != ACTIVE:
            return orjson.dumps((_ENC_TOMBSTONE, self.id, self.status, self.merged_into, self.seq))
        return orjson.dumps(
            (
                _ENC_ACTIVE,
                self.id,
                self.seq,
                self.created_ms,
                self.first_ms,
                self.last_ms,
                self.events,
                self.orders,
                {k: str(v) for k, v in self.revenue.items()} if self.revenue else None,
                self.channels,
                self.sources,
                self.ids,
                self.apart,
                self.merged_from,
                self.split_from,
                self.extra or None,
            )
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProfileState:
        """Inverse of `to_dict`."""
        p = cls(d["id"], d.get("c", 0))
        p.status = d["st"]
        p.seq = d["seq"]
        if p.status != ACTIVE:
            p.merged_into = d.get("into")
            return p
        p.first_ms = d["f"]
        p.last_ms = d["l"]
        p.events = d["ev"]
        p.orders = d["o"]
        p.revenue = {k: Decimal(v) for k, v in d["rev"].items()}
        p.channels = d["ch"]
        p.sources = d["src"]
        p.ids = d["ids"]
        types: dict[str, int] = {}
        for r in p.ids.values():
            types[r[R_TYPE]] = types.get(r[R_TYPE], 0) + 1
        p.types = types
        p.apart = tuple(d["ap"])
        p.merged_from = tuple(d["mf"])
        p.split_from = d["sf"]
        p.extra = d["x"]
        return p

    @classmethod
    def decode(cls, raw: bytes) -> ProfileState:
        """Inverse of `encode`; also reads the JSON rows earlier versions stored (positional or `to_dict`)."""
        if raw[:1] == ROW_FORMAT:
            if _row_to_json is None:
                return _unpack_row(raw)
            try:
                raw = _row_to_json(raw)
            except ValueError:  # damaged, or an `extra` too deep for serde_json: the Python codec tells which
                return _unpack_row(raw)
        try:
            return cls._from_json(raw)
        except InvalidOperation as exc:  # a revenue string that is no decimal: the row is damaged
            raise ValueError(f"profile row with an invalid revenue amount: {exc!r}") from None

    @classmethod
    def _from_json(cls, raw: bytes) -> ProfileState:
        d = orjson.loads(raw)
        if type(d) is dict:
            return cls.from_dict(d)
        p = cls.__new__(cls)
        if d[0] == _ENC_TOMBSTONE:
            _, p.id, p.status, p.merged_into, p.seq = d
            p.created_ms = p.first_ms = p.last_ms = p.events = p.orders = 0
            p.revenue, p.channels, p.sources, p.ids, p.types, p.extra = {}, {}, {}, {}, {}, {}
            p.apart = p.merged_from = ()
            p.split_from = None
            return p
        (
            _,
            p.id,
            p.seq,
            p.created_ms,
            p.first_ms,
            p.last_ms,
            p.events,
            p.orders,
            rev,
            p.channels,
            p.sources,
            ids,
            apart,
            merged_from,
            p.split_from,
            extra,
        ) = d
        p.status = ACTIVE
        p.merged_into = None
        p.revenue = {k: Decimal(v) for k, v in rev.items()} if rev else {}
        p.ids = ids
        types: dict[str, int] = {}
        for r in ids.values():
            t = r[0]  # R_TYPE
            types[t] = types.get(t, 0) + 1
        p.types = types
        p.apart = tuple(apart) if apart else ()
        p.merged_from = tuple(merged_from) if merged_from else ()
        p.extra = extra or {}
        return p

    def snapshot(self) -> dict[str, Any]:
        """Readable summary for snapshots and `explain`: identifiers with first/last seen, source."""
        return {
            "profile_id": self.id,
            "status": self.status,
            "merged_into": self.merged_into,
            "seq": self.seq,
            "first_activity_ms": self.first_ms,
            "last_activity_ms": self.last_ms,
            "events": self.events,
            "orders": self.orders,
            "revenue": {k: str(v) for k, v in sorted(self.revenue.items())},
            "channels": {k: {"count": v[0], "last_seen_ms": v[1]} for k, v in sorted(self.channels.items())},
            "sources": {k: {"count": v[0], "last_seen_ms": v[1]} for k, v in sorted(self.sources.items())},
            "identifiers": {
                key: {
                    "type": r[R_TYPE],
                    "first_seen_ms": r[R_FIRST],
                    "last_seen_ms": r[R_LAST],
                    "source": r[R_SOURCE],
                    "verified": bool(r[R_VERIFIED]),
                }
                for key, r in sorted(self.ids.items())
            },
            "merged_from": list(self.merged_from),
            "split_from": self.split_from,
        }


# --- the packed row in Python: the same bytes as native/src/state.rs (`Profile::to_row`), for an install
# without the native module; tests/unit/test_core_state.py holds the two to each other

# a record's flags: its booleans, and what it leaves out because its key or profile says it
_TYPE_IN_KEY, _ORIGIN_IS_PROFILE, _VERIFIED, _VERIFIED_AS_INT, _HAS_NEIGHBOURS = 1, 2, 4, 8, 16
_U64 = (1 << 64) - 1


def _wrapping(n: int) -> int:
    """`n` as a signed 64-bit integer, wrapping like Rust's `wrapping_sub`/`wrapping_add`."""
    return ((n + (1 << 63)) & _U64) - (1 << 63)


class _Packer:
    __slots__ = ("out",)

    def __init__(self) -> None:
        self.out = bytearray(ROW_FORMAT)

    def uint(self, n: int) -> None:
        out = self.out
        while n >= 0x80:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)

    def signed(self, n: int) -> None:
        if not -(1 << 63) <= n < 1 << 63:
            raise OverflowError(f"{n} does not fit a signed 64-bit integer")  # as the native codec refuses it
        self.uint(((n << 1) ^ (n >> 63)) & _U64)

    def blob(self, b: bytes) -> None:
        self.uint(len(b))
        self.out += b

    def name(self, s: str) -> None:
        """A name the cache would make a symbol: in a row, always 0 and the text."""
        self.out.append(0)
        self.blob(s.encode())

    def opt_str(self, s: str | None) -> None:
        if s is None:
            self.out.append(0)
        else:
            b = s.encode()
            self.uint(len(b) + 1)
            self.out += b

    def strs(self, ss: tuple[str, ...]) -> None:
        self.uint(len(ss))
        for s in ss:
            self.blob(s.encode())

    def slots(self, slots: dict[str, list[int]], base: int) -> None:
        self.uint(len(slots))
        for name, (count, at) in slots.items():
            self.name(name)
            self.signed(count)
            self.signed(_wrapping(at - base))


def _pack_row(p: ProfileState) -> bytes:
    w = _Packer()
    w.blob(p.id.encode())
    w.name(p.status)
    w.signed(p.seq)
    if p.status != ACTIVE:
        w.opt_str(p.merged_into)
        return bytes(w.out)
    base = p.created_ms
    w.signed(base)
    w.signed(_wrapping(p.first_ms - base))
    w.signed(_wrapping(p.last_ms - base))
    w.signed(p.events)
    w.signed(p.orders)
    w.uint(len(p.revenue))
    for currency, amount in p.revenue.items():
        w.name(currency)
        w.blob(str(amount).encode())
    w.slots(p.channels, base)
    w.slots(p.sources, base)
    w.uint(len(p.ids))
    for key, r in p.ids.items():
        key_bytes, type_bytes = key.encode(), r[R_TYPE].encode()
        verified = r[R_VERIFIED]
        flags = 0
        if key_bytes.find(b":") == len(type_bytes) and key_bytes.startswith(type_bytes):
            flags |= _TYPE_IN_KEY
        if r[R_ORIGIN] == p.id:
            flags |= _ORIGIN_IS_PROFILE
        if verified:
            flags |= _VERIFIED
        if type(verified) is not bool:
            flags |= _VERIFIED_AS_INT
        if r[R_NB] is not None:
            flags |= _HAS_NEIGHBOURS
        w.out.append(flags)
        w.blob(key_bytes)
        if not flags & _TYPE_IN_KEY:
            w.name(r[R_TYPE])
        w.signed(_wrapping(r[R_FIRST] - base))
        w.signed(_wrapping(r[R_LAST] - r[R_FIRST]))
        w.name(r[R_SOURCE])
        if flags & _VERIFIED_AS_INT:
            w.signed(verified)
        w.blob(r[R_VIA].encode())
        if not flags & _ORIGIN_IS_PROFILE:
            w.blob(r[R_ORIGIN].encode())
        if r[R_NB] is not None:
            w.uint(len(r[R_NB]))
            for code in r[R_NB]:
                w.signed(code)
    w.strs(p.apart)
    w.strs(p.merged_from)
    w.opt_str(p.split_from)
    w.opt_str(orjson.dumps(p.extra).decode() if p.extra else None)
    return bytes(w.out)


class _Unpacker:
    __slots__ = ("at", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.at = len(ROW_FORMAT)

    def uint(self) -> int:
        n = shift = 0
        while True:
            if self.at >= len(self.raw):
                raise ValueError("packed profile row cut short")
            b = self.raw[self.at]
            self.at += 1
            if shift == 63 and b > 1:  # a tenth byte may hold one bit of 64
                raise ValueError("packed profile row: varint too long")
            n |= (b & 0x7F) << shift
            if b < 0x80:
                return n
            shift += 7

    def signed(self) -> int:
        n = self.uint()
        return (n >> 1) ^ -(n & 1)

    def text(self, length: int) -> str:
        end = self.at + length
        if end > len(self.raw):
            raise ValueError("packed profile row cut short")
        s = self.raw[self.at : end].decode()
        self.at = end
        return s

    def string(self) -> str:
        return self.text(self.uint())

    def name(self) -> str:
        if self.uint() != 0:
            raise ValueError("packed profile row holds a symbol")
        return self.string()

    def opt_str(self) -> str | None:
        n = self.uint()
        return None if n == 0 else self.text(n - 1)

    def strs(self) -> tuple[str, ...]:
        return tuple(self.string() for _ in range(self.uint()))

    def slots(self, base: int) -> dict[str, list[int]]:
        slots: dict[str, list[int]] = {}
        for _ in range(self.uint()):
            name = self.name()
            count = self.signed()
            slots[name] = [count, _wrapping(base + self.signed())]
        return slots


def _unpack_row(raw: bytes) -> ProfileState:
    r = _Unpacker(raw)
    p = ProfileState.__new__(ProfileState)
    p.id, p.status, p.seq = r.string(), r.name(), r.signed()
    p.revenue, p.channels, p.sources, p.ids, p.types, p.extra = {}, {}, {}, {}, {}, {}
    p.apart = p.merged_from = ()
    p.split_from = p.merged_into = None
    if p.status != ACTIVE:
        p.merged_into = r.opt_str()
        p.created_ms = p.first_ms = p.last_ms = p.events = p.orders = 0
    else:
        base = p.created_ms = r.signed()
        p.first_ms = _wrapping(base + r.signed())
        p.last_ms = _wrapping(base + r.signed())
        p.events, p.orders = r.signed(), r.signed()
        for _ in range(r.uint()):
            currency, amount = r.name(), r.string()
            try:
                p.revenue[currency] = Decimal(amount)
            except InvalidOperation:
                raise ValueError(f"packed profile row: revenue {amount!r} is no decimal") from None
        p.channels = r.slots(base)
        p.sources = r.slots(base)
        for _ in range(r.uint()):
            flags = r.raw[r.at] if r.at < len(r.raw) else 0x80  # one byte, as Rust reads it
            if flags >= 0x80:
                raise ValueError("packed profile row: bad record flags")
            r.at += 1
            key = r.string()
            type_ = key[: key.index(":")] if flags & _TYPE_IN_KEY else r.name()
            first = _wrapping(base + r.signed())
            last = _wrapping(first + r.signed())
            source = r.name()
            verified: bool | int = r.signed() if flags & _VERIFIED_AS_INT else bool(flags & _VERIFIED)
            via = r.string()
            origin = p.id if flags & _ORIGIN_IS_PROFILE else r.string()
            nb = [r.signed() for _ in range(r.uint())] if flags & _HAS_NEIGHBOURS else None
            p.ids[key] = [type_, first, last, source, verified, via, origin, nb]
            p.types[type_] = p.types.get(type_, 0) + 1
        p.apart = r.strs()
        p.merged_from = r.strs()
        p.split_from = r.opt_str()
        extra = r.opt_str()
        p.extra = orjson.loads(extra) if extra is not None else {}
        if type(p.extra) is not dict:
            raise ValueError("packed profile row: extra fields are not a JSON object")
    if r.at != len(raw):
        raise ValueError("packed profile row: bytes after its end")
    return p
