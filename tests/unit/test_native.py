"""The Rust link engine (`streams.core.native.NativeGraph`) against the Python core, value for value.

The promise: for any input, rules, cache sizes and flush cadence, `NativeGraph` returns the same LinkResults
as `IdentityGraph` (types included: a tuple where Python has a tuple, a ChangeKind, dict payloads), keeps
the same stats, and leaves the same bytes under every key of its store. Each test feeds both engines the
same input and compares every result, the stats, and every key and value of the two stores:

1. random streams over a small universe (four people, values they share: merges, refusals, limits,
   generic and shared values, corroboration all happen) under 20 rule sets; a long stream; revenue sums
   at the edge of Python's decimal context; 1,030 events sharing an id and a millisecond;
2. native caches of one entry and every flush cadence; tiny Python caches; `link_many`;
3. one store handed between the engines mid-stream, either way; RocksDB closed, compacted and reopened;
4. split / erase / explain through `NativeGraph.python()` between native links;
5. the core's own scenario tests (Kolya, the family iPad, the cashier's phone…) on a `DualGraph`;
6. `omnistitch replay --engine python` and `--engine native`: assignments, resolved events, RocksDB;
7. states written by earlier versions (dict-form rows, no neighbour index) or other tools;
8. inputs validation never produces but the Python core takes (control characters, colons in types,
   times outside the ULID's 48 bits, money as floats and odd strings, a key twice with both flags).

A failure names the first differing value and prints the steps that led to it as Python code.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import inspect
import itertools
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from streams.core import IdentityGraph, LinkResult, MemoryStore, RocksStore, Rules, TypeLimit, load_rules
from streams.core.rules import DEFAULT_RULES_PATH, rules_from_mapping
from streams.core.state import ORDER_TYPES, ROW_FORMAT, ProfileState
from streams.events import Identifier, NormalizedEvent
from streams.exceptions import UnknownProfileOrIdentifier
from tests.native_toolchain import can_build

if not can_build():
    # `make setup` builds the module wherever cargo >= 1.85 is; without it, test one installed some other way
    pytest.importorskip(
        "omnistitch_native",
        reason="no cargo >= 1.85 and omnistitch_native is not built: no native engine to compare",
    )

from streams.core.native import NativeGraph, native_available

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]


def test_the_native_module_is_built() -> None:
    assert native_available(), (
        "cargo >= 1.85 is on PATH, so `make setup` must have built omnistitch_native; it does not import"
    )


def _native(store: Any, rules: Rules | None, **kw: Any) -> NativeGraph:
    """A NativeGraph, never a silent fallback: the compiled module must be there."""
    if not native_available():
        pytest.fail("omnistitch_native does not import: nothing native would be compared")
    return NativeGraph(store, rules, **kw)


# --- comparison -----------------------------------------------------------------------------------------


def _first_diff(a: Any, b: Any, path: str = "", *, ordered: bool = False) -> tuple[str, Any, Any] | None:
    """The first place where `a` and `b` differ, types included (bool is not int, list is not tuple).

    `ordered`: dict key order counts too (it does for JSON that must be byte-identical).
    """
    here = path or "value"
    if type(a) is not type(b):
        return f"{here} (type {type(a).__name__} vs {type(b).__name__})", a, b
    if isinstance(a, dict):
        if set(a) != set(b):
            return (
                f"{here} keys (only python / only native)",
                sorted(map(str, set(a) - set(b))),
                sorted(map(str, set(b) - set(a))),
            )
        for k in a:
            d = _first_diff(a[k], b[k], f"{path}[{k!r}]", ordered=ordered)
            if d is not None:
                return d
        if ordered and list(a) != list(b):
            return f"{here} key order", list(a), list(b)
        return None
    if hasattr(a, "_fields"):  # a NamedTuple (LinkResult)
        for name, x, y in zip(a._fields, a, b, strict=True):
            d = _first_diff(x, y, f"{path}.{name}", ordered=ordered)
            if d is not None:
                return d
        return None
    if isinstance(a, list | tuple):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            d = _first_diff(x, y, f"{path}[{i}]", ordered=ordered)
            if d is not None:
                return d
        return None if len(a) == len(b) else (f"{here} length", len(a), len(b))
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        for f in dataclasses.fields(a):
            d = _first_diff(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}", ordered=ordered)
            if d is not None:
                return d
        return None
    return None if a == b else (here, a, b)


def _json_or_raw(raw: bytes | None) -> Any:
    if raw is None:
        return None
    if raw[:1] == ROW_FORMAT:  # a packed profile row: its JSON, for a readable difference
        raw = ProfileState.decode(raw).positional_json()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw


def _dump(store: Any) -> dict[bytes, bytes]:
    """Every key and value of a store."""
    if isinstance(store, MemoryStore):
        return dict(store._data)
    return dict(store.iter_prefix(b""))


class StrictStore(MemoryStore):
    """A MemoryStore that takes nothing but what the Store protocol names: bytes keys, bytes values or None
    (a custom store, or RocksDB's WriteBatch, need not accept a bytearray, a memoryview or a str)."""

    def get(self, key: bytes) -> bytes | None:
        assert type(key) is bytes, f"get({key!r})"
        return super().get(key)

    def put(self, key: bytes, value: bytes) -> None:
        assert type(key) is bytes and type(value) is bytes, f"put({key!r}, {value!r})"
        super().put(key, value)

    def delete(self, key: bytes) -> None:
        assert type(key) is bytes, f"delete({key!r})"
        super().delete(key)

    def write_batch(self, items: Iterable[tuple[bytes, bytes | None]]) -> None:
        def checked() -> Iterator[tuple[bytes, bytes | None]]:
            for item in items:
                key, value = item
                assert type(key) is bytes and (value is None or type(value) is bytes), (
                    f"write_batch: {item!r}"
                )
                yield key, value

        super().write_batch(checked())

    def iter_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        assert type(prefix) is bytes, f"iter_prefix({prefix!r})"
        return super().iter_prefix(prefix)


def _code(ev: NormalizedEvent) -> str:
    """The event as Python code."""
    ids = ", ".join(
        f"Identifier({i.type!r}, {i.value!r}{', True' if i.verified else ''})" for i in ev.identifiers
    )
    comma = "," if len(ev.identifiers) == 1 else ""
    attrs = f", attributes={ev.attributes!r}" if ev.attributes else ""
    return (
        f"NormalizedEvent({ev.event_id!r}, {ev.source!r}, {ev.channel!r}, {ev.type!r}, "
        f"{ev.occurred_at_ms}, ({ids}{comma}){attrs})"
    )


def _short(value: Any, limit: int = 3_000) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]} … ({len(text) - limit} more characters)"


class Trace:
    """The steps taken so far, printed as code with a failure: the reproduction."""

    def __init__(self, header: str) -> None:
        self.lines = [header]

    def add(self, line: str) -> None:
        self.lines.append(line)

    def fail(self, what: str) -> NoReturn:
        steps = "\n".join(f"    {line}" for line in self.lines)
        pytest.fail(f"{what}\n\nreproduction ({len(self.lines) - 1} steps):\n{steps}")

    def check(self, what: str, expected: Any, got: Any, *, ordered: bool = False) -> None:
        d = _first_diff(expected, got, ordered=ordered)
        if d is not None:
            where, x, y = d
            self.fail(
                f"{what} differs at {where}:\n  python: {x!r}\n  native: {y!r}\n"
                f"whole python: {_short(expected)}\nwhole native: {_short(got)}"
            )

    def check_stores(self, py_store: Any, nat_store: Any, when: str) -> None:
        a, b = _dump(py_store), _dump(nat_store)
        if a == b:
            return
        keys = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
        out = []
        for k in keys[:6]:
            line = f"  {k!r}\n    python: {a.get(k)!r}\n    native: {b.get(k)!r}"
            d = _first_diff(_json_or_raw(a.get(k)), _json_or_raw(b.get(k)), ordered=True)
            if d is not None and a.get(k) is not None and b.get(k) is not None:
                line += f"\n    first difference at {d[0]}: {d[1]!r} vs {d[2]!r}"
            out.append(line)
        more = f"\n  … and {len(keys) - 6} more" if len(keys) > 6 else ""
        self.fail(f"stores differ {when} in {len(keys)} key(s):\n" + "\n".join(out) + more)


def _link_both(py: IdentityGraph, nat: NativeGraph, ev: NormalizedEvent, trace: Trace) -> LinkResult:
    """Link `ev` on both; the results and the stats after it must be equal."""
    trace.add(f"g.link({_code(ev)})")
    try:
        expected = py.link(ev)
    except Exception as exc:  # inputs the Python core rejects: the native engine must not accept them
        try:
            got = nat.link(ev)
        except type(exc):
            raise _PythonRaised from exc
        except Exception as other:
            trace.fail(f"python link raised {exc!r}, native link raised {other!r}")
        trace.fail(f"python link raised {exc!r}, native link returned {got!r}")
    try:
        got = nat.link(ev)
    except Exception as exc:
        trace.fail(f"native link raised {exc!r}; python returned {expected!r}")
    trace.check("LinkResult", expected, got)
    trace.check("stats", py.stats, nat.stats)
    return got


class _PythonRaised(Exception):
    """The Python core raised on an input (and so did the native engine): the example ends there."""


def _flush_both(py: IdentityGraph, nat: NativeGraph, nat_store: Any, trace: Trace, when: str) -> None:
    trace.add("g.flush()")
    py.flush()
    nat.flush()
    trace.check_stores(py.store, nat_store, when)
    trace.check("stats", py.stats, nat.stats)


def _differential(
    events: list[NormalizedEvent],
    rules: Rules | None,
    trace: Trace,
    *,
    history: bool = True,
    py_kw: dict[str, Any] | None = None,
    nat_kw: dict[str, Any] | None = None,
    flushes: Iterable[int] = (),
) -> tuple[IdentityGraph, NativeGraph, list[LinkResult]]:
    """Every event on both engines (flushing both after the positions in `flushes`), then the stores."""
    py = IdentityGraph(StrictStore(), rules, history=history, **(py_kw or {}))
    nat_store = StrictStore()
    nat = _native(nat_store, rules, history=history, **(nat_kw or {}))
    at = set(flushes)
    results = []
    for i, ev in enumerate(events):
        results.append(_link_both(py, nat, ev, trace))
        if i in at:
            _flush_both(py, nat, nat_store, trace, f"after event #{i}")
    _flush_both(py, nat, nat_store, trace, "at the end")
    return py, nat, results


# --- inputs ---------------------------------------------------------------------------------------------

_DAY = 86_400_000
_T0 = 1_700_000_000_000
# A small universe of four people, each with one value of every type, and values several people use (a
# shop's phone, a family iPad, cookies with awkward characters): an event mostly carries one person's values,
# sometimes another's, so merges, refusals, limits, generic and shared values and corroboration all happen.
_PEOPLE = 4
_PERSON_KEYS = (
    "customer_id:c{}",
    "loyalty_card:L{}",
    "phone:+7916000000{}",
    "email:p{}@x.ru",
    "device_id:d{}",
    "cookie_id:k{}",
    "vk_id:v{}",  # unranked, weak, no limit
)
_SHARED_KEYS = (
    "phone:+70000000000",
    "email:shop@x.ru",
    "device_id:ipad",
    'device_id:d"3\\',  # escaped in JSON
    "cookie_id:a",
    "cookie_id:a:b",  # a colon in the value: `r:cookie_id:a:` also meets `cookie_id:a:b`'s keys
    "cookie_id:кука",
)
_SLOTS = len(_PERSON_KEYS) + len(_SHARED_KEYS)
_KEYS = tuple(k.format(p) for p in range(_PEOPLE) for k in _PERSON_KEYS) + _SHARED_KEYS


def _key(person: int, slot: int) -> str:
    if slot < len(_PERSON_KEYS):
        return _PERSON_KEYS[slot].format(person % _PEOPLE)
    return _SHARED_KEYS[slot - len(_PERSON_KEYS)]


_NO_TOTAL = object()  # the attributes carry no `total`
_TOTALS: tuple[Any, ...] = (
    Decimal("10.00"),
    _NO_TOTAL,
    Decimal("0"),
    Decimal("-5.5"),
    Decimal("1290"),
    Decimal("0.001"),
    Decimal("2.5"),
    Decimal("12345678901234567890.123"),
    Decimal("1E+3"),
    Decimal("-0.00"),
    Decimal("1E+30"),  # beyond 28 digits once something is added: Python's decimal context rounds
    Decimal("0.0000000001"),
    Decimal("99999999999999999999999999.99"),
    Decimal("-1E-5"),
    Decimal("0.0000001"),  # str() gives 1E-7
    Decimal("9999999999999999999999999999"),  # + 0.5: a tie at the 28th digit, rounded half-even (up)
    Decimal("1234567890123456789012345678"),  # + 0.5: a tie rounded half-even (down)
    Decimal("0.5"),
    Decimal("100.000000"),
    7,  # an integer, as JSON gives it
    "3.30",  # a decimal string, as NormalizedEvent.from_bytes gives it
)
_CURRENCIES = ("RUB", "RUB", "EUR", None, "")  # None: no `currency` key
_TYPES = ("page_view",) * 4 + ("login", "login", "store_purchase", "order_placed", "cart_updated", "erase")
_STEPS = (1_000,) * 6 + (0, 1, -1, -60_000, 3_600_000, _DAY, 2 * _DAY + 1, -_DAY)
_CHANNELS = (
    ("web", "web"),
    ("app", "mobile_app"),
    ("pos", "store"),
    ("call_center", "phone"),
    ("crm", "crm"),
)
# a new event id, an earlier event's id at this event's time, or an earlier event's id *and* time (its
# derived profile id is taken: the next free variant must be found the same way)
_ID_MODES = ("new",) * 8 + ("again", "again_same_ms")

_OTHER = (0,) * 12 + (1, 2, 3)  # mostly the event's own person
_SLOT = tuple(range(len(_PERSON_KEYS))) * 3 + tuple(range(len(_PERSON_KEYS), _SLOTS))  # mostly own values
_EVENT = st.tuples(
    st.integers(0, _PEOPLE - 1),  # whose event it is
    # (whose value: 0 = the event's person, else another; which value; verified)
    st.lists(st.tuples(st.sampled_from(_OTHER), st.sampled_from(_SLOT), st.booleans()), max_size=5),
    st.sampled_from(_TYPES),
    st.sampled_from(_STEPS),
    st.sampled_from(_ID_MODES),
    st.integers(0, 63),  # which earlier event an id is taken from
    st.sampled_from(_CHANNELS),
    st.integers(0, len(_TOTALS) - 1),
    st.sampled_from(_CURRENCIES),
    st.sampled_from((False,) * 9 + (True,)),  # flush both engines after it and compare the stores
)
EVENTS = st.lists(_EVENT, min_size=8, max_size=50)
Spec = list[tuple[Any, ...]]


def _build(spec: Spec, *, one_flag_per_key: bool = True) -> tuple[list[NormalizedEvent], list[int]]:
    """Events from `EVENTS` draws, and the positions after which both engines flush."""
    events: list[NormalizedEvent] = []
    flushes: list[int] = []
    at = _T0
    for n, (person, ids, etype, step, mode, pick, (source, channel), ti, currency, flush) in enumerate(spec):
        at += step
        event_id, when = f"e{n}", at
        if mode != "new" and events:
            prior = events[pick % len(events)]
            event_id = prior.event_id
            if mode == "again_same_ms":
                when = prior.occurred_at_ms
        first: dict[str, Identifier] = {}
        idents = []
        for other, slot, verified in ids:
            t, _, value = _key(person + other, slot).partition(":")
            # a key twice in one event comes with one flag: the core sorts Identifiers, and two different
            # ones of one key do not compare (TypeError; validation never hands the core such an event)
            ident = Identifier(t, value, verified)
            idents.append(first.setdefault(ident.key, ident) if one_flag_per_key else ident)
        attrs: dict[str, Any] = {}
        if etype in ORDER_TYPES or etype == "cart_updated":
            attrs["order_id"] = event_id
            total = _TOTALS[ti]
            if total is not _NO_TOTAL:
                attrs["total"] = total
            if currency is not None:
                attrs["currency"] = currency
        events.append(NormalizedEvent(event_id, source, channel, etype, when, tuple(idents), attrs))
        if flush:
            flushes.append(n)
    return events, flushes


def _random_spec(rng: random.Random, n: int, erase_weight: int = 1) -> Spec:
    """A long spec like `EVENTS` draws, from a seeded generator (for the tests without hypothesis)."""
    types = (*_TYPES[:-1],) * erase_weight + ("erase",)
    return [
        (
            rng.randrange(_PEOPLE),
            [
                (rng.choice(_OTHER), rng.choice(_SLOT), rng.random() < 0.3)
                for _ in range(rng.choice((0, 1, 1, 2, 2, 3, 4, 5)))
            ],
            rng.choice(types),
            rng.choice(_STEPS),
            rng.choice(_ID_MODES),
            rng.randrange(64),
            rng.choice(_CHANNELS),
            rng.randrange(len(_TOTALS)),
            rng.choice(_CURRENCIES),
            rng.random() < 0.02,
        )
        for _ in range(n)
    ]


def _rule_sets() -> dict[str, tuple[Rules, bool]]:
    """name → (rules, history) the differential runs under."""
    shipped = load_rules(DEFAULT_RULES_PATH)

    def m(data: dict[str, Any]) -> Rules:
        return rules_from_mapping(data, shipped)

    strong = ["customer_id", "loyalty_card", "phone", "email"]
    return {
        "shipped": (shipped, True),
        "shipped-no-history": (shipped, False),
        "unprotected": (Rules.unprotected(), True),
        "protection-flag-off": (dataclasses.replace(shipped, protection=False), True),
        "windowed-limits": (
            m(
                {
                    "limits": {
                        "phone": {"max": 2, "window_days": 1},
                        "email": {"max": 1, "window_days": 2},
                        "device_id": {"max": 2, "window_days": 1},
                        "cookie_id": 2,
                        "vk_id": 1,
                    }
                }
            ),
            True,
        ),
        "max-identifiers-3": (m({"protection": {"max_identifiers": 3}}), True),
        "generic-strict": (
            m(
                {
                    "generic": {
                        "types": ["phone", "email", "device_id", "cookie_id", "vk_id"],
                        "max_distinct_strong": {"customer_id": 1, "loyalty_card": 1, "phone": 1, "email": 1},
                    }
                }
            ),
            True,
        ),
        "generic-off": (m({"generic": {"enabled": False}}), True),
        "shared-off": (m({"shared_devices": {"enabled": False}}), True),
        "shared-max-2": (
            m(
                {
                    "shared_devices": {
                        "max_people": 2,
                        "types": ["device_id", "cookie_id", "vk_id"],
                        "person_types": ["customer_id", "phone"],
                    }
                }
            ),
            True,
        ),
        "no-corroboration": (m({"protection": {"corroborate_soft_bridges": False}}), True),
        "weak-may-bridge": (m({"protection": {"weak_cannot_bridge": False}}), True),
        "verified-not-special": (m({"protection": {"verified_beats_unverified": False}}), True),
        "other-priority": (
            m(
                {
                    "priority": [
                        "vk_id",
                        "email",
                        "phone",
                        "cookie_id",
                        "device_id",
                        "loyalty_card",
                        "customer_id",
                    ],
                    "protection": {"strong_types": [*strong, "vk_id"], "unique_types": ["loyalty_card"]},
                }
            ),
            True,
        ),
        "checks-off": (
            m(
                {
                    "protection": {
                        "weak_cannot_bridge": False,
                        "verified_beats_unverified": False,
                        "corroborate_soft_bridges": False,
                        "max_identifiers": 0,
                    },
                    "generic": {"enabled": False},
                    "shared_devices": {"enabled": False},
                }
            ),
            True,
        ),
        # rules the TOML loader would refuse, but the dataclass takes and the Python core follows
        "zero-limits": (
            dataclasses.replace(
                shipped,
                limits={**shipped.limits, "phone": TypeLimit(0), "cookie_id": TypeLimit(1, window_ms=0)},
                generic_max={**shipped.generic_max, "email": 0},
            ),
            True,
        ),
        "zero-caps": (dataclasses.replace(shipped, max_identifiers=0, shared_max_people=0), True),
        # a type listed twice ranks by its last place, and unlisted types rank len(rank), here a listed rank
        "priority-repeats": (
            dataclasses.replace(shipped, priority=("phone", "email", "phone", "vk_id")),
            True,
        ),
        "unvalidated": (
            dataclasses.replace(
                shipped,
                unique_types=frozenset({"customer_id", "vk_id"}),
                shared_types=frozenset({"device_id", "email"}),
                shared_person_types=frozenset({"phone", "vk_id"}),
                generic_types=frozenset({"customer_id", "vk_id", "cookie_id"}),
                generic_max={"vk_id": 1, "phone": 2, "device_id": 1},
            ),
            True,
        ),
        "bare-dataclass": (
            dataclasses.replace(
                Rules(), limits={}, generic_max={}, unique_types=frozenset(), priority=("phone", "email")
            ),
            True,
        ),
    }


RULE_SETS = _rule_sets()
_NAMES = sorted(RULE_SETS)


def _header(name: str, **kw: Any) -> str:
    extra = "".join(f", {k}={v!r}" for k, v in kw.items())
    return f"# rules: RULE_SETS[{name!r}]{extra}"


# --- 1. random streams under every rule set -------------------------------------------------------------


@pytest.mark.parametrize("name", _NAMES)
@settings(max_examples=70, deadline=None, suppress_health_check=_SLOW)
@given(spec=EVENTS)
def test_any_stream_gives_the_same_results_stats_and_stored_bytes(name: str, spec: Spec) -> None:
    rules, history = RULE_SETS[name]
    events, flushes = _build(spec)
    trace = Trace(_header(name, history=history))
    py, nat, _ = _differential(events, rules, trace, history=history, flushes=flushes)
    nat.compact()  # a flush, then the store's own compaction: nothing may change
    trace.check_stores(py.store, nat.python().store, "after compact()")


def test_a_long_stream_with_a_larger_state() -> None:
    """3,000 events: many profiles, long merge chains, generations rotating in both engines' caches."""
    events, flushes = _build(_random_spec(random.Random(20251126), 3_000, erase_weight=6))
    for name in ("shipped", "windowed-limits", "unprotected"):
        rules, history = RULE_SETS[name]
        trace = Trace(_header(name) + "  # events: _build(_random_spec(random.Random(20251126), 3000, 6))")
        _differential(
            events,
            rules,
            trace,
            history=history,
            py_kw={"cache_profiles": 50, "cold_profiles": 200, "cache_identifiers": 100, "flush_every": 97},
            nat_kw={"cache_profiles": 64, "cache_identifiers": 128, "flush_every": 500},
            flushes=flushes,
        )


def test_revenue_sums_round_as_pythons_decimal_context() -> None:
    """Every pair of totals summed in one profile, and merged from two: 28 significant digits, half-even,
    `str(Decimal)` notation; and all of them in one profile forwards and backwards (rounding makes the
    order of additions count)."""
    rules = Rules.unprotected()
    amounts = [t for t in _TOTALS if t is not _NO_TOTAL]
    events = []
    at = _T0
    for i, x in enumerate(amounts):
        for j, y in enumerate(amounts):
            at += 1_000
            for n, (key, total) in enumerate(((f"customer_id:a{i}-{j}", x), (f"cookie_id:k{i}-{j}", y))):
                t, _, v = key.partition(":")
                attrs = {"order_id": "o", "total": total, "currency": "RUB"}
                events.append(
                    NormalizedEvent(
                        f"o{i}-{j}-{n}", "pos", "store", "store_purchase", at, (Identifier(t, v),), attrs
                    )
                )
            pair = (Identifier("customer_id", f"a{i}-{j}"), Identifier("cookie_id", f"k{i}-{j}"))
            events.append(NormalizedEvent(f"m{i}-{j}", "web", "web", "login", at + 1, pair))  # merge the two
    for direction, seq in (("up", amounts), ("down", amounts[::-1])):
        for n, total in enumerate(seq):
            attrs = {"order_id": "o", "total": total, "currency": "EUR"}
            events.append(
                NormalizedEvent(
                    f"{direction}{n}",
                    "pos",
                    "store",
                    "order_placed",
                    at + n,
                    (Identifier("phone", direction),),
                    attrs,
                )
            )
    trace = Trace("# rules: Rules.unprotected()")
    _differential(events, rules, trace)


def test_one_event_id_at_one_millisecond_for_more_profiles_than_its_id_has_variants() -> None:
    """1,030 events share an id and a time: the first 1,024 new profiles take the steps of the derived id's
    last ten bits, the rest a salted id (`derive_profile_id_where`)."""
    events = [
        NormalizedEvent("dup", "web", "web", "page_view", _T0, (Identifier("cookie_id", f"k{n}"),))
        for n in range(1_030)
    ]
    rules, _ = RULE_SETS["shipped"]
    _, _, results = _differential(
        events, rules, Trace("# rules: shipped"), nat_kw={"cache_profiles": 1, "flush_every": 100}
    )
    assert len({r.profile_id for r in results}) == len(events)


def test_more_names_than_the_packed_form_has_symbols_for() -> None:
    """The packed cold cache stores sources, channels, currencies and identifier types as symbols, 4,096 at
    most and none over 64 bytes; other names are packed as text. Profiles here are unpacked again and again
    (a hot cache of one), with names of both kinds, and read back the same as the Python graph's."""
    rng = random.Random(4096)
    events = []
    for n in range(3_000):
        person = rng.randrange(200)
        idents = (Identifier("email", f"p{person}@x.ru", True), Identifier(f"t{n % 700}", f"v{person}"))
        order = n % 3 == 0
        events.append(
            NormalizedEvent(
                f"e{n}",
                f"source {n}",
                f"channel {n}" + ("ё" * 40 if n % 5 == 0 else ""),  # past 64 bytes: never a symbol
                "order_placed" if order else "page_view",
                _T0 + n,
                idents,
                {"total": Decimal("1.5"), "currency": f"C{n % 900}"} if order else {},
            )
        )
    rules, _ = RULE_SETS["unprotected"]
    _, nat, _ = _differential(
        events, rules, Trace("# rules: unprotected"), nat_kw={"cache_profiles": 1, "flush_every": 7}
    )
    assert nat.cache_sizes()["symbols"] == 4_096


def test_cache_sizes_count_what_the_caches_hold() -> None:
    """`cache_sizes()` (printed by bench_core.py): with packed caches larger than the state, every profile
    row is held packed but those still decoded (a profile is packed when it leaves the decoded cache, here of
    one), every identifier row's owner is held, and the byte counts are the entries' sizes."""
    events, _ = _build(_random_spec(random.Random(8), 400))
    nat = _native(MemoryStore(), RULE_SETS["shipped"][0], cache_profiles=1)
    for ev in (ev for ev in events if ev.type != "erase"):  # an erase event empties the caches
        nat.link(ev)
    nat.flush()
    sizes = nat.cache_sizes()
    profiles = [v for _, v in nat.store.iter_prefix(b"p:")]
    owners = [k for k, _ in nat.store.iter_prefix(b"i:")]
    assert sizes["decoded_profiles"] > 0
    assert len(profiles) - sizes["decoded_profiles"] <= sizes["packed_profiles"] <= len(profiles)
    assert sizes["owners"] >= len(owners)  # and the identifiers looked up that have no owner
    # one length byte and the id before each packed profile, and fewer bytes than its row (names as symbols)
    assert sizes["packed_profiles"] * 27 < sizes["packed_profile_bytes"] < sum(len(v) for v in profiles)
    assert sizes["owner_bytes"] > sum(len(k) for k in owners)


def test_packed_caches_compact_the_records_replaced_profiles_leave() -> None:
    """The caches' arenas: a profile packed again leaves its old record behind, and a chunk whose dead
    records reach a quarter of it is compacted, so the chunks stay within a third above the live entries (and
    one chunk being filled per table); every read meanwhile finds the moved records (the same results and
    rows as the Python graph, hot cache of one profile so every event reads the packed one)."""
    rng = random.Random(11)
    events = []
    for n in range(4_000):
        person = rng.randrange(300)
        idents = (Identifier("email", f"p{person}@x.ru", True), Identifier("device_id", f"d{person % 290}"))
        events.append(NormalizedEvent(f"e{n}", "web", f"channel {n % 7}", "page_view", _T0 + n, idents))
    _, nat, _ = _differential(
        events, Rules(), Trace("# arena compaction"), nat_kw={"cache_profiles": 1, "flush_every": 3}
    )
    sizes = nat.cache_sizes()
    assert sizes["arena_compactions"] > 0
    chunk = 256 << 10
    assert sizes["packed_profile_arena_bytes"] <= sizes["packed_profile_bytes"] * 4 / 3 + 2 * chunk
    assert sizes["owner_arena_bytes"] <= sizes["owner_bytes"] * 4 / 3 + 2 * chunk


@pytest.mark.parametrize("start", [10**16, 1e16, 2.5])
def test_the_events_counter_adds_up_as_in_python(start: float) -> None:
    """The native engine adds a flush window's events to an integer `events` counter at once; a float one (a
    hand-edited or foreign state) takes them one at a time, as Python's `+=` does: 1e16 + 1 rounds back to
    1e16 at every event, where adding 7 at once would not."""
    events = [
        NormalizedEvent(f"e{n}", "web", "web", "page_view", _T0 + n, (Identifier("email", f"p{n % 3}@x.ru"),))
        for n in range(8)
    ]
    counted = []
    for make in (IdentityGraph, _native):
        store = MemoryStore()
        store.put(b"m:stats", orjson.dumps({"events": start}))
        graph = make(store, Rules(), flush_every=5)
        for ev in events:
            graph.link(ev)
        assert graph.stats["events"] == start + len(events) or isinstance(start, float)
        graph.flush()
        counted.append((graph.stats["events"], orjson.loads(store.get(b"m:stats") or b"{}")["events"]))
    assert counted[0] == counted[1]
    assert type(counted[1][0]) is type(start)


def test_a_profile_larger_than_a_chunk_is_cached_and_replaced() -> None:
    """A packed profile over 256 KiB (a value that long: validation caps them, the core does not) takes a
    chunk of its own, read and replaced like any other, and freed once replaced."""
    long = "x" * (300 << 10)
    # four profiles in turn through a decoded cache of one: each leaves it, packed, and comes back
    idents = [(Identifier("cookie_id", f"{long}{n % 4}"),) for n in range(16)]
    events = [NormalizedEvent(f"e{n}", "web", "web", "page_view", _T0 + n, i) for n, i in enumerate(idents)]
    _, nat, _ = _differential(events, Rules(), Trace("# a large record"), nat_kw={"cache_profiles": 1})
    sizes = nat.cache_sizes()
    assert sizes["packed_profiles"] >= 2
    # a chunk per packed profile, and the one small records fill: the replaced records' chunks were freed
    bound = sizes["packed_profiles"] * ((300 << 10) + 1024) + (256 << 10)
    assert sizes["packed_profile_arena_bytes"] < bound


_OVERFLOWING = Decimal("9E+999999")  # twice this passes Python's decimal context: the sum raises Overflow


def _failing_link_stream() -> list[NormalizedEvent]:
    """Orders whose revenue sums overflow, on the hot path and in a merge, among events that rotate caches."""

    def order(n: int, *keys: str) -> NormalizedEvent:
        idents = tuple(Identifier(*k.split(":", 1)) for k in keys)
        total = {"total": _OVERFLOWING, "currency": "RUB"}
        return NormalizedEvent(f"o{n}", "pos", "store", "store_purchase", _T0 + n, idents, total)

    def visit(n: int, key: str) -> NormalizedEvent:
        return NormalizedEvent(f"v{n}", "web", "web", "page_view", _T0 + n, (Identifier(*key.split(":", 1)),))

    return [
        order(1, "email:a@x.ru"),
        order(2, "email:b@x.ru"),
        order(3, "email:a@x.ru"),  # the hot path: a's sum overflows
        *(visit(10 + n, f"cookie_id:k{n}") for n in range(6)),  # other profiles: the hot cache rotates
        visit(20, "email:a@x.ru"),
        order(21, "email:a@x.ru", "cookie_id:k1"),  # k1's profile merges into a's, then the sum overflows
        visit(30, "email:a@x.ru"),
        visit(31, "email:b@x.ru"),
        NormalizedEvent(
            "m",
            "crm",
            "crm",
            "identify",
            _T0 + 40,
            (Identifier("email", "a@x.ru"), Identifier("email", "b@x.ru")),
        ),  # the merge's sum overflows
        *(visit(50 + n, f"cookie_id:k{n}") for n in range(6)),
        visit(60, "email:a@x.ru"),
        visit(61, "email:b@x.ru"),
    ]


@pytest.mark.parametrize(
    "nat_kw",
    [
        {},
        {"cache_profiles": 1},
        {"cache_profiles": 1, "cold_profiles": 0},
        {"cache_profiles": 1, "flush_every": 1_000},
    ],
    ids=["defaults", "hot-1", "hot-1-no-cold", "hot-1-long-batches"],
)
@pytest.mark.parametrize("same_caches", [False, True], ids=["python-defaults", "python-same-caches"])
def test_a_link_that_raises_changes_nothing_in_either_engine(
    nat_kw: dict[str, int], same_caches: bool
) -> None:
    """An order whose revenue sum overflows Python's decimal context raises in both engines: on the hot path,
    after a merge that stands, and inside a merge. The sums come before any count, so a failed event leaves
    no half-counted profile in a decoded cache, where it would reach one engine's store and not the other's
    (the native engine drops decoded profiles at other moments than the Python graph)."""
    rules, _ = RULE_SETS["unprotected"]
    trace = Trace(f"# rules: unprotected; native={nat_kw}, python same caches: {same_caches}")
    py = IdentityGraph(StrictStore(), rules, **(nat_kw if same_caches else {}))
    nat_store = StrictStore()
    nat = _native(nat_store, rules, **nat_kw)
    raised = 0
    for ev in _failing_link_stream():
        try:
            _link_both(py, nat, ev, trace)
        except _PythonRaised:
            raised += 1
    _flush_both(py, nat, nat_store, trace, "at the end")
    assert raised == 3
    pid = py.lookup("email:a@x.ru")
    a = py.profile(pid) if pid else None
    assert a is not None and (a.events, a.orders) == (6, 1), "the three failed events left no count"


def test_events_with_up_to_64_identifiers() -> None:
    """Validation lets an event carry 64 identifiers: size caps, limits and merges of many values at once."""
    rng = random.Random(64)
    types = ("customer_id", "loyalty_card", "phone", "email", "device_id", "cookie_id", "vk_id")
    events = []
    for n in range(120):
        keys = {(rng.choice(types), f"v{rng.randrange(40)}") for _ in range(rng.choice((1, 8, 30, 64)))}
        idents = tuple(Identifier(t, v, rng.random() < 0.2) for t, v in sorted(keys))
        events.append(NormalizedEvent(f"big{n}", "crm", "crm", "identify", _T0 + n * 60_000, idents))
    for name in ("shipped", "unprotected", "checks-off", "max-identifiers-3"):
        rules, history = RULE_SETS[name]
        _differential(events, rules, Trace(_header(name)), history=history, flushes=range(0, 120, 17))


# --- 2. cache sizes and flush cadence -------------------------------------------------------------------


# the Python graph's cold cache of encoded profiles has a native counterpart where the wrapper takes one
_NATIVE_COLD = "cold_profiles" in inspect.signature(NativeGraph).parameters


@pytest.mark.parametrize(
    ("cache_profiles", "cold_profiles", "cache_identifiers", "flush_every"),
    # Python takes < 1 as 1 (cold: < 0 as 0); the last two keep many profiles spilled (encoded, waiting for
    # the flush) and read them back before it, from the cold cache or, without one, from the spilled rows
    [(1, None, 1, 1), (1, 0, 1, 3), (1, 1, 1, 7), (0, 0, 0, 0), (1, None, 1, 1_000), (1, 0, 1, 1_000)],
)
@settings(max_examples=40, deadline=None, suppress_health_check=_SLOW)
@given(spec=EVENTS, name=st.sampled_from(_NAMES))
def test_native_caches_of_one_entry_change_nothing(
    cache_profiles: int,
    cold_profiles: int | None,
    cache_identifiers: int,
    flush_every: int,
    spec: Spec,
    name: str,
) -> None:
    rules, history = RULE_SETS[name]
    events, flushes = _build(spec)
    nat_kw = {
        "cache_profiles": cache_profiles,
        "cache_identifiers": cache_identifiers,
        "flush_every": flush_every,
    }
    if cold_profiles is not None and _NATIVE_COLD:
        nat_kw["cold_profiles"] = cold_profiles
    trace = Trace(_header(name, history=history, native=nat_kw))
    _differential(events, rules, trace, history=history, nat_kw=nat_kw, flushes=flushes)


@pytest.mark.parametrize(
    "kw",
    [{"cache_profiles": -1}, {"cache_identifiers": -3}, {"flush_every": -2}],
    ids=["cache_profiles", "cache_identifiers", "flush_every"],
)
def test_cache_sizes_and_flush_cadence_below_one_are_taken_as_one_as_python_does(kw: dict[str, int]) -> None:
    events, flushes = _build(_random_spec(random.Random(3), 200))
    rules, _ = RULE_SETS["shipped"]
    trace = Trace(f"# rules: shipped; IdentityGraph(**{kw}) and NativeGraph(**{kw})")
    try:
        _native(MemoryStore(), rules, **kw)
    except Exception as exc:
        trace.fail(f"NativeGraph(store, rules, **{kw}) raised {exc!r}; IdentityGraph takes them as 1")
    _differential(events, rules, trace, py_kw=kw, nat_kw=kw, flushes=flushes)


@settings(max_examples=40, deadline=None, suppress_health_check=_SLOW)
@given(spec=EVENTS, name=st.sampled_from(_NAMES), flush_every=st.sampled_from([1, 2, 5]))
def test_python_caches_of_one_entry_against_native_defaults(spec: Spec, name: str, flush_every: int) -> None:
    rules, history = RULE_SETS[name]
    events, _ = _build(spec)
    py_kw = {"cache_profiles": 1, "cold_profiles": 1, "cache_identifiers": 1, "flush_every": flush_every}
    trace = Trace(_header(name, history=history, python=py_kw))
    _differential(events, rules, trace, history=history, py_kw=py_kw)


@settings(max_examples=30, deadline=None, suppress_health_check=_SLOW)
@given(spec=EVENTS, name=st.sampled_from(_NAMES), flush_every=st.sampled_from([1, 4, 20_000]))
def test_link_many_yields_the_same_and_flushes_at_the_end(spec: Spec, name: str, flush_every: int) -> None:
    rules, history = RULE_SETS[name]
    events, _ = _build(spec)
    trace = Trace(_header(name, history=history, flush_every=flush_every) + "  # link_many(events)")
    for ev in events:
        trace.add(f"  {_code(ev)},")
    py_store, nat_store = MemoryStore(), MemoryStore()
    py = IdentityGraph(py_store, rules, history=history)
    nat = _native(nat_store, rules, history=history, cache_profiles=2, flush_every=flush_every)
    expected = list(py.link_many(events))
    got = list(nat.link_many(events))
    trace.check("link_many results", expected, got)
    trace.check_stores(py_store, nat_store, "after link_many (no explicit flush)")
    trace.check("stats", py.stats, nat.stats)


# --- 3. hand-overs between the engines on one store -----------------------------------------------------


@settings(max_examples=80, deadline=None, suppress_health_check=_SLOW)
@given(
    spec=EVENTS,
    name=st.sampled_from(_NAMES),
    cuts=st.lists(st.integers(0, 40), min_size=1, max_size=3),
    native_first=st.booleans(),
)
def test_engines_hand_one_store_over_to_each_other(
    spec: Spec, name: str, cuts: list[int], native_first: bool
) -> None:
    """Python for a stretch, flushed, then the native engine on the same store, and so on (either first):
    the same results, bytes and stats as Python alone."""
    rules, history = RULE_SETS[name]
    events, _ = _build(spec)
    ref = IdentityGraph(MemoryStore(), rules, history=history)
    expected, stats = [], []
    for ev in events:
        expected.append(ref.link(ev))
        stats.append(copy.deepcopy(ref.stats))
    ref.flush()
    store = MemoryStore()
    bounds = sorted({min(c, len(events)) for c in cuts} | {0, len(events)})
    trace = Trace(_header(name, history=history) + "; store = MemoryStore()")
    use_native = native_first
    for lo, hi in itertools.pairwise(bounds):
        engine = "NativeGraph" if use_native else "IdentityGraph"
        trace.add(f"g = {engine}(store, rules, history={history})")
        g: Any = (
            _native(store, rules, history=history)
            if use_native
            else IdentityGraph(store, rules, history=history)
        )
        for i in range(lo, hi):
            trace.add(f"g.link({_code(events[i])})")
            try:
                got = g.link(events[i])
            except Exception as exc:
                trace.fail(f"{engine}.link raised {exc!r} after the hand-over")
            trace.check(f"{engine} LinkResult of event #{i}", expected[i], got)
        trace.add("g.flush()")
        g.flush()
        if hi > lo:
            trace.check(f"{engine} stats after event #{hi - 1}", stats[hi - 1], g.stats)
        use_native = not use_native
    trace.check_stores(ref.store, store, "after the last hand-over")


def test_native_engine_on_rocksdb_closed_and_reopened_every_hundred_events(tmp_path: Path) -> None:
    events, _ = _build(_random_spec(random.Random(7), 600, erase_weight=8))
    rules, _ = RULE_SETS["shipped"]
    ref = IdentityGraph(MemoryStore(), rules)
    expected = [ref.link(ev) for ev in events]
    ref.flush()
    trace = Trace("# rules: shipped; NativeGraph(RocksStore(path)) closed and reopened every 100 events")
    path = tmp_path / "state"
    for lo in range(0, len(events), 100):
        nat = _native(RocksStore(path), rules, cache_profiles=5, cache_identifiers=5, flush_every=13)
        trace.add(f"g = NativeGraph(RocksStore(path), rules)  # events {lo}..{lo + 99}")
        for i in range(lo, min(lo + 100, len(events))):
            trace.add(f"g.link({_code(events[i])})")
            trace.check(f"LinkResult of event #{i}", expected[i], nat.link(events[i]))
        nat.compact()  # RocksDB reopens its files: no iterator of the engine's may hold them
        trace.add("g.compact()")
        nat.close()
        trace.add("g.close()")
    store = RocksStore(path)
    try:
        trace.check_stores(ref.store, store, "after the last reopen")
        trace.check("stats", ref.stats, orjson.loads(store.get(b"m:stats") or b"{}"))
    finally:
        store.close()


class FailingStore(MemoryStore):
    """A store whose `method` raises OSError (a full disk) from its `after`-th call on."""

    def __init__(self, method: str, after: int) -> None:
        super().__init__()
        self.method, self.after, self.calls = method, after, 0

    def _tick(self, method: str) -> None:
        if method == self.method:
            self.calls += 1
            if self.calls > self.after:
                raise OSError(28, "No space left on device")

    def get(self, key: bytes) -> bytes | None:
        self._tick("get")
        return super().get(key)

    def write_batch(self, items: Iterable[tuple[bytes, bytes | None]]) -> None:
        self._tick("write_batch")
        super().write_batch(items)

    def iter_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        self._tick("iter_prefix")
        return super().iter_prefix(prefix)


@pytest.mark.parametrize("method", ["get", "write_batch", "iter_prefix"])
@pytest.mark.parametrize("after", [0, 2])
def test_a_store_error_reaches_the_caller_as_it_is(method: str, after: int) -> None:
    """An OSError of the store comes out of `link` / `flush` as that OSError (not a Rust panic, which
    Python sees as a BaseException that `except Exception` handlers miss)."""
    events, _ = _build(_random_spec(random.Random(11), 60, erase_weight=5))
    rules, _ = RULE_SETS["shipped"]
    for engine in ("python", "native"):
        store = FailingStore(method, 1 << 30)
        kw: dict[str, Any] = {"cache_profiles": 1, "cache_identifiers": 1, "flush_every": 3}
        g: Any = IdentityGraph(store, rules, **kw) if engine == "python" else _native(store, rules, **kw)
        store.after, store.calls = after, 0
        with pytest.raises(OSError, match="No space left"):  # from a link or from the flush
            for ev in events:
                g.link(ev)
            g.flush()


# --- 4. operator actions through python() ---------------------------------------------------------------


_OPS = st.lists(
    st.tuples(
        st.integers(0, 40),
        st.sampled_from(("split", "erase_identifier", "erase_profile", "explain")),
        st.integers(0, 1 << 10),
    ),
    max_size=4,
)


def _outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        return ("returned", call())
    except (UnknownProfileOrIdentifier, ValueError) as exc:
        return ("raised", type(exc).__name__, str(exc))


def _operator_args(
    ref: IdentityGraph, kind: str, pick: int, pids: list[str], now: int
) -> tuple[str, tuple[Any, ...], dict[str, Any]] | None:
    """(method, args, kwargs) of an operator action on what the reference graph holds, or None."""
    key = _KEYS[pick % len(_KEYS)]
    if kind == "split":
        candidates = sorted(p.id for p in ref.iter_profiles() if len(p.ids) >= 2)
        if not candidates:
            return None
        pid = candidates[pick % len(candidates)]
        p = ref.profile(pid)
        assert p is not None
        ids = sorted(p.ids)
        keys = [k for j, k in enumerate(ids) if (pick >> j) & 1]
        if not keys or len(keys) == len(ids):
            keys = ids[:1]
        kw: dict[str, Any] = {"reason": f"ticket {pick}"}
        if pick % 3 == 0:
            kw["at_ms"] = now - 5
        return "split", (pid, keys), kw
    if kind == "erase_identifier":
        return "erase", (key,), {"event_id": f"op{pick}", "at_ms": now} if pick % 2 else {}
    if kind == "erase_profile":
        return ("erase", (pids[pick % len(pids)],), {}) if pids else None
    return "explain", (key,), {}


@settings(max_examples=100, deadline=None, suppress_health_check=_SLOW)
@given(spec=EVENTS, name=st.sampled_from(_NAMES), ops=_OPS)
def test_operator_actions_through_python_are_seen_by_the_native_engine(
    spec: Spec, name: str, ops: list[tuple[int, str, int]]
) -> None:
    """split / erase / explain through `NativeGraph.python()` between links, as through one Python graph."""
    rules, history = RULE_SETS[name]
    events, _ = _build(spec)
    ref = IdentityGraph(MemoryStore(), rules, history=history)
    nat_store = MemoryStore()
    nat = _native(nat_store, rules, history=history)
    trace = Trace(_header(name, history=history))
    todo: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for pos, kind, pick in ops:
        todo[min(pos, len(events) - 1)].append((kind, pick))
    pids: list[str] = []
    results: list[LinkResult] = []
    for i, ev in enumerate(events):
        r = _link_both(ref, nat, ev, trace)
        results.append(r)
        pids.extend(
            pid for pid in (r.profile_id, *(c.profile_id for c in r.changes)) if pid and pid not in pids
        )
        for kind, pick in todo[i]:
            op = _operator_args(ref, kind, pick, pids, ev.occurred_at_ms)
            if op is None:
                continue
            method, args, kw = op
            trace.add(f"py = g.python(); py.{method}(*{args!r}, **{kw!r}); py.flush()")
            expected = _outcome(functools.partial(getattr(ref, method), *args, **kw))
            py = nat.python()
            got = _outcome(functools.partial(getattr(py, method), *args, **kw))
            py.flush()
            ref.flush()
            event(f"{method} {expected[0]}")
            trace.check(f"{method} through python()", expected, got)
            trace.check_stores(ref.store, nat_store, f"after {method}")
            trace.check(f"stats after {method}", ref.stats, nat.stats)
            if method == "split" and expected[0] == "returned":
                pids.append(expected[1][0])
    _flush_both(ref, nat, nat_store, trace, "at the end")
    py = nat.python()
    for n, r in enumerate(results):
        trace.check(
            f"final_profile of event #{n}",
            ref.final_profile(r.profile_id, r.anchor),
            py.final_profile(r.profile_id, r.anchor),
        )


@pytest.mark.parametrize("then", ["link", "stats", "python", "flush", "close"])
def test_a_split_through_python_needs_no_flush_of_its_own(then: str) -> None:
    """`python()` lends a graph for operator actions; what it does must reach the engine's next link, its
    stats, the next `python()`, and the store at the engine's next flush or close, even when the caller
    never flushes that graph (the wrapper's job, as `NativeGraph.python` promises)."""
    rules = load_rules(DEFAULT_RULES_PATH)
    mum, phone, cookie = (
        Identifier("email", "mum@x.ru"),
        Identifier("phone", "+7123"),
        Identifier("cookie_id", "k1"),
    )
    ref = IdentityGraph(MemoryStore(), rules)
    nat_store = MemoryStore()
    nat = _native(nat_store, rules)
    trace = Trace("# rules: shipped")
    _link_both(ref, nat, NormalizedEvent("1", "web", "web", "login", _T0, (mum, cookie)), trace)
    _link_both(ref, nat, NormalizedEvent("2", "web", "web", "login", _T0 + 1_000, (phone, mum)), trace)
    pid = ref.lookup("phone:+7123")
    assert pid is not None
    expected = ref.split(pid, ["phone:+7123"], reason="two people")
    trace.add(f"g.python().split({pid!r}, ['phone:+7123'], reason='two people')  # not flushed by the caller")
    got = nat.python().split(pid, ["phone:+7123"], reason="two people")
    trace.check("split", expected, got)
    if then == "link":
        later = NormalizedEvent("3", "web", "web", "login", _T0 + 2_000, (phone, mum))
        r = _link_both(ref, nat, later, trace)
        assert r.profile_id == expected[0]  # the phone's events go to the split-off profile
    elif then == "stats":
        trace.check("stats after the split", ref.stats, nat.stats)
    elif then == "python":
        assert nat.python().lookup("phone:+7123") == expected[0]
    ref.flush()
    if then == "close":
        nat.close()
    else:
        nat.flush()
    trace.check_stores(ref.store, nat_store, f"after the split, then {then}")


# --- 5. the core's scenario tests, run on the native engine ---------------------------------------------


class DualGraph:
    """`IdentityGraph`'s interface over a NativeGraph, each answer checked against an IdentityGraph fed alike.

    Links go to both engines; operator actions and queries go to the reference and to `native.python()`.
    The store handed in (or a new MemoryStore) is the native engine's; the reference works on a copy of it
    taken now, so scenarios that reopen or rewrite a store between graphs keep working.
    """

    built = 0

    def __init__(self, store: MemoryStore | None = None, rules: Rules | None = None, **kw: Any) -> None:
        DualGraph.built += 1
        self.store = store if store is not None else MemoryStore()
        if not isinstance(self.store, MemoryStore):
            raise TypeError("DualGraph runs over a MemoryStore")
        shadow = MemoryStore()
        shadow._data = dict(self.store._data)
        self.ref = IdentityGraph(shadow, rules, **kw)
        native_kw = ("cache_profiles", "cache_identifiers", "flush_every", "history")
        self.native = _native(self.store, rules, **{k: v for k, v in kw.items() if k in native_kw})
        self.rules = self.ref.rules
        self.trace = Trace(f"g = DualGraph(rules={rules!r}, **{kw!r})  # store of {len(shadow._data)} keys")

    def link(self, ev: NormalizedEvent) -> LinkResult:
        return _link_both(self.ref, self.native, ev, self.trace)

    def link_many(self, events: Iterable[NormalizedEvent]) -> Iterator[LinkResult]:
        events = list(events)
        self.trace.add(f"list(g.link_many({[_code(e) for e in events]}))")
        expected = list(self.ref.link_many(events))
        got = list(self.native.link_many(events))
        self.trace.check("link_many", expected, got)
        self.trace.check_stores(self.ref.store, self.store, "after link_many")
        return iter(got)

    def flush(self) -> None:
        _flush_both(self.ref, self.native, self.store, self.trace, "at a flush")

    def close(self) -> None:
        self.flush()
        self.ref.close()
        self.native.close()

    def compact(self) -> None:
        self.flush()
        self.ref.compact()
        self.native.compact()

    @property
    def stats(self) -> dict[str, Any]:
        self.trace.check("stats", self.ref.stats, self.native.stats)
        return self.native.stats

    def _both(self, name: str, args: tuple[Any, ...], kw: dict[str, Any], *, mutates: bool) -> Any:
        self.trace.add(f"g.{name}(*{args!r}, **{kw!r})")
        outs: list[tuple[Any, ...]] = []
        for graph in (self.ref, self.native.python()):
            try:
                value = getattr(graph, name)(*args, **kw)
                if isinstance(value, Iterator):
                    value = list(value)
                outs.append(("returned", value, _comparable(value)))
            except Exception as exc:
                outs.append(("raised", exc, (type(exc).__name__, str(exc))))
            if mutates:
                graph.flush()
        (k1, _, c1), (k2, v2, c2) = outs
        self.trace.check(name, (k1, c1), (k2, c2))
        if mutates:
            self.trace.check_stores(self.ref.store, self.store, f"after {name}")
        if k2 == "raised":
            raise v2
        return v2

    def split(self, *args: Any, **kw: Any) -> Any:
        return self._both("split", args, kw, mutates=True)

    def erase(self, *args: Any, **kw: Any) -> Any:
        return self._both("erase", args, kw, mutates=True)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)

        def query(*args: Any, **kw: Any) -> Any:
            return self._both(name, args, kw, mutates=False)

        return query


def _comparable(value: Any) -> Any:
    """Profiles as their stored bytes; everything else as it is."""
    if isinstance(value, ProfileState):
        return ("ProfileState", value.encode())
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


def _scenario_tests() -> list[Any]:
    out = []
    for module in ("tests.unit.test_core_scenarios", "tests.unit.test_core_state"):
        mod = importlib.import_module(module)
        for name, fn in vars(mod).items():
            if name.startswith("test_") and callable(fn) and not inspect.signature(fn).parameters:
                out.append(pytest.param(module, name, id=f"{module.rsplit('.', 1)[1]}::{name}"))
    return out


@pytest.mark.parametrize(("module", "name"), _scenario_tests())
def test_core_scenario_on_the_native_engine(module: str, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each scenario of the core's own tests (Kolya, the family iPad, the cashier's phone, splits, erasure…)
    with every graph it builds a DualGraph: its assertions hold on the native engine's answers, and each
    answer equals the Python graph's."""
    mod = importlib.import_module(module)
    monkeypatch.setattr(mod, "IdentityGraph", DualGraph)
    before = DualGraph.built
    getattr(mod, name)()
    if DualGraph.built == before:
        pytest.skip("builds no graph")


# --- 6. end to end: replay on RocksDB with either engine ------------------------------------------------


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated population, with erase events in the middle and at the end."""
    from streams.simulate import SimConfig, simulate
    from streams.validate import validate_event

    out = tmp_path_factory.mktemp("native-sim")
    simulate(SimConfig(people=1500, days=14, seed=21), out)
    lines = (out / "all.jsonl").read_bytes().splitlines()
    for n, at in enumerate((len(lines) // 3, 2 * len(lines) // 3, len(lines))):
        victim = orjson.loads(lines[at // 2])  # someone seen earlier
        erase = {
            **orjson.loads(lines[at - 1]),
            "event_id": f"erase-{n}",
            "type": "erase",
            "identifiers": victim["identifiers"],
            "attributes": {},
        }
        line = orjson.dumps(erase)
        validate_event(line)
        lines.insert(at, line)
    path = out / "input.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _rocks_dump(path: Path) -> dict[bytes, bytes]:
    store = RocksStore(path)
    try:
        return _dump(store)
    finally:
        store.close()


def _resolved_without_clock(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_bytes().splitlines():
        record = orjson.loads(line)
        record.pop("resolved_at_ms")
        out.append(record)
    return out


_CUSTOM_RULES = """
[protection]
corroborate_soft_bridges = false
max_identifiers = 6
[limits]
phone = { max = 2, window_days = 3 }
email = 2
[generic.max_distinct_strong]
phone = 1
email = 1
[shared_devices]
max_people = 2
"""


@pytest.mark.parametrize("rules_file", [None, "custom"])
def test_replay_with_either_engine_writes_the_same_files_and_rocksdb(
    population: Path, tmp_path: Path, rules_file: str | None
) -> None:
    """`replay --engine python` and `--engine native` (the CLI), into fresh states and then once more into the
    same states (the input again: every event id repeated): the same assignments, resolved events (but their
    clock), RocksDB keys and values, and stats."""
    from typer.testing import CliRunner

    from streams.cli import app
    from streams.replay import replay

    rules_path = None
    if rules_file is not None:
        rules_path = tmp_path / "rules.toml"
        rules_path.write_text(_CUSTOM_RULES)
    trace = Trace(f"# omnistitch replay {population} --rules {rules_path} --engine python / --engine native")
    for run in ("fresh", "continued"):
        py = replay(
            [population],
            tmp_path / "py-state",
            tmp_path / f"py-{run}.jsonl",
            rules_path=rules_path,
            resolved=tmp_path / f"py-{run}-resolved.jsonl",
            workers=0,
            engine="python",
        )
        args = ["replay", str(population), "--state", str(tmp_path / "native-state")]
        args += ["--assignments", str(tmp_path / f"native-{run}.jsonl")]
        args += ["--resolved", str(tmp_path / f"native-{run}-resolved.jsonl"), "--engine", "native"]
        args += ["--rules", str(rules_path)] if rules_path is not None else []
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert py.valid > 5_000 and py.stats["merges"] > 0 and py.stats["erased"] > 0
        trace.add(f"# {run} state")
        trace.check(
            f"assignments ({run} state)",
            (tmp_path / f"py-{run}.jsonl").read_bytes().splitlines(),
            (tmp_path / f"native-{run}.jsonl").read_bytes().splitlines(),
        )
        trace.check(
            f"resolved events ({run} state)",
            _resolved_without_clock(tmp_path / f"py-{run}-resolved.jsonl"),
            _resolved_without_clock(tmp_path / f"native-{run}-resolved.jsonl"),
        )
        py_db, native_db = _rocks_dump(tmp_path / "py-state"), _rocks_dump(tmp_path / "native-state")
        a, b = MemoryStore(), MemoryStore()
        a._data, b._data = py_db, native_db
        trace.check_stores(a, b, f"after the replay into a {run} state")
        trace.check("stats", py.stats, orjson.loads(native_db[b"m:stats"]))


def test_replay_engine_option_takes_auto_python_native_only(population: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from streams.cli import app

    args = [
        "replay",
        str(population),
        "--state",
        str(tmp_path / "s"),
        "--assignments",
        str(tmp_path / "a.jsonl"),
    ]
    assert CliRunner().invoke(app, [*args, "--engine", "rust"]).exit_code != 0
    result = CliRunner().invoke(app, [*args, "--engine", "auto"])
    assert result.exit_code == 0, result.output
    assert re.search(r"engine\s*│?\s*native", result.output), result.output  # the summary names the engine


# --- 7. states written by earlier versions or other tools -----------------------------------------------


def _make_legacy(store: MemoryStore) -> None:
    """Rewrite a state as earlier versions (and other aggregators) left it: `to_dict` profile rows, some with
    `extra` fields, no `n:` index, no index marker, and stats in another key order, with counters missing
    and one more."""
    rows = []
    for n, (k, v) in enumerate(store.iter_prefix(b"p:")):
        p = ProfileState.decode(v)
        if n % 2:
            p.extra = {"segment": f"s{n}", "score": [n, 1.5, 1e-7, 1e22], "nested": {"z": None, "a": True}}
        rows.append((k, orjson.dumps(p.to_dict())))
    drops: list[tuple[bytes, bytes | None]] = [(k, None) for k, _ in store.iter_prefix(b"n:")]
    stats = orjson.loads(store.get(b"m:stats") or b"{}")
    stats.pop("shared", None)
    stats.pop("generic", None)
    stats = {"custom": [1, {"b": 2}], **dict(reversed(list(stats.items())))}
    store.write_batch([*rows, *drops, (b"m:neighbour-index", None), (b"m:stats", orjson.dumps(stats))])


@settings(max_examples=40, deadline=None, suppress_health_check=_SLOW)
@given(spec=EVENTS, name=st.sampled_from(_NAMES), cut=st.integers(0, 40))
def test_a_state_in_the_earlier_encoding_is_continued_the_same(spec: Spec, name: str, cut: int) -> None:
    rules, history = RULE_SETS[name]
    events, _ = _build(spec)
    first = IdentityGraph(MemoryStore(), rules, history=history)
    for ev in events[:cut]:
        first.link(ev)
    first.flush()
    assert isinstance(first.store, MemoryStore)
    _make_legacy(first.store)
    py_store, nat_store = MemoryStore(), MemoryStore()
    py_store._data = dict(first.store._data)
    nat_store._data = dict(first.store._data)
    trace = Trace(
        _header(name, history=history) + f"  # a legacy state made of events[:{cut}] by _make_legacy"
    )
    for ev in events[:cut]:
        trace.add(f"#   {_code(ev)}")
    py = IdentityGraph(py_store, rules, history=history)
    nat = _native(nat_store, rules, history=history)
    for ev in events[cut:]:
        _link_both(py, nat, ev, trace)
    _flush_both(py, nat, nat_store, trace, "at the end")


def _hand_edit(store: MemoryStore, edit: str) -> None:
    """Rows another tool could have written, which the Python core reads and continues: `extra` fields of
    other aggregators (merged by `absorb`), revenue as non-canonical decimal strings ("+10.00", "-05.5"),
    verified flags as 0 / 1, an empty neighbour list for none, a record's type other than its key's, profile
    ids that are no ULIDs (lower case: the native owner cache holds them as text, not as a ULID's bits)."""
    if edit == "ids-not-ulids":
        pids = [k[2:] for k, _ in store.iter_prefix(b"p:")]

        def lower(raw: bytes) -> bytes:
            for pid in pids:
                raw = raw.replace(pid, pid.lower())  # the same length: packed rows stay valid
            return raw

        store._data = {lower(k): lower(v) for k, v in store._data.items()}
        return
    rows = []
    for n, (k, v) in enumerate(store.iter_prefix(b"p:")):
        d = orjson.loads(ProfileState.decode(v).positional_json())  # edited, written back as JSON
        if d[0] != 1:
            continue
        if edit == "extra" and n % 2:
            d[15] = {
                "segment": f"s{n}",
                "score": [n, 1.5, 1e-7, 1e22, -0.0],
                "nested": {"z": None, "a": True},
            }
        if edit == "revenue" and d[8]:
            d[8] = {c: (a.replace("-", "-0", 1) if a.startswith("-") else f"+{a}") for c, a in d[8].items()}
        for j, rec in enumerate(d[11].values()):
            if edit == "verified-as-int" and (n + j) % 2:
                rec[4] = int(rec[4])
            if edit == "empty-neighbours" and rec[7] is None and j % 2:
                rec[7] = []
            if edit == "type-not-in-key" and (n + j) % 3 == 0:
                rec[0] = rec[0][:2]  # "ph" for "phone:…": not the key's type
        rows.append((k, orjson.dumps(d)))
    store.write_batch(rows)


@pytest.mark.parametrize(
    "edit", ["extra", "revenue", "verified-as-int", "empty-neighbours", "type-not-in-key", "ids-not-ulids"]
)
@pytest.mark.parametrize("name", ["shipped", "unprotected", "windowed-limits"])
def test_a_hand_edited_state_is_continued_the_same(edit: str, name: str) -> None:
    """Not a state the core writes, but one it reads and continues: so must the native engine. (Seeded
    streams, not hypothesis: a divergence here shows in the first differing row, and shrinking is slow.)"""
    rules, history = RULE_SETS[name]
    for seed in range(4):
        events, _ = _build(_random_spec(random.Random(seed), 80, erase_weight=8))
        first = IdentityGraph(MemoryStore(), rules, history=history)
        for ev in events[:40]:
            first.link(ev)
        first.flush()
        assert isinstance(first.store, MemoryStore)
        _hand_edit(first.store, edit)
        py_store, nat_store = MemoryStore(), MemoryStore()
        py_store._data = dict(first.store._data)
        nat_store._data = dict(first.store._data)
        trace = Trace(
            _header(name, history=history)
            + f"  # events = _build(_random_spec(random.Random({seed}), 80, 8))[0]; events[:40] linked by"
            + f" IdentityGraph, then _hand_edit(store, {edit!r})"
        )
        py = IdentityGraph(py_store, rules, history=history)
        # odd seeds: a hot cache of one, rotated at every event, so edited rows go through the packed form too
        cold = {"cache_profiles": 1, "flush_every": 1} if seed % 2 else {}
        nat = _native(nat_store, rules, history=history, **cold)
        for ev in events[40:]:
            _link_both(py, nat, ev, trace)
        _flush_both(py, nat, nat_store, trace, "at the end")


# --- 8. inputs validation never produces, which the Python core takes -----------------------------------


_I64 = 2**63
_WILD_TIMES = (_T0, 0, 1, -1, -_DAY, 2**48 - 1, 2**48, 2**48 + 999, 2**53 + 1, 2**62, _I64 - 1, -_I64)
_WILD_EVENT_IDS = ("w", "", "é", "a#1", "ev\n1", 'q"uote\\', "\x00", "😀", "x" * 300)
_WILD_LABELS = ("web", "", "касса", "\t", 'x"y', "😀")
_WILD_KEYS = (
    ("customer_id", "c1"),
    ("phone", "+79160000001"),
    ("email", "anna@x.ru"),
    ("device_id", "ipad"),
    ("vk_id", "v1"),
    ("", "empty-type"),
    ("x:y", "z"),  # key "x:y:z": its neighbour code takes the type from the key ("x")
    ("x", "y:z"),  # the same key, another type
    ("тип", "значение"),
    ("cookie_id", "\x00\x1f\x7f"),
    ("cookie_id", "\u2028\u2029"),
    ("email", 'a"b\\c@x'),
    ("phone", "😀"),
    ("device_id", ""),
    ("customer_id", "C" * 500),
)
_WILD_TOTALS: tuple[Any, ...] = (
    _NO_TOTAL,
    None,
    5,
    -3,
    10**30,
    "3.30",
    "abc",  # not a number: the order counts, no revenue
    "",
    0.1,
    1e20,
    1e-7,
    True,
    "NaN",
    "Infinity",
    "-0",
    Decimal("NaN"),
    Decimal("1E+40"),
    Decimal("1E-40"),
    Decimal("0E-10"),
    Decimal("-1E+3"),
    # strings Python's Decimal reads (and a strict parser may not)
    "1_000",
    " 5 ",
    "+5",
    "5.",
    ".5",
    "1e3",
    "١٢٣",  # Arabic-Indic digits
    "nan",
    "-NaN",
    "Inf",
    "-0E+5",
    "0.000001",
)
_WILD_CURRENCIES: tuple[Any, ...] = (
    _NO_TOTAL,
    "RUB",
    None,
    "",
    643,
    'X"Y',
    "\u0440\u0443\u0431",
    False,
    0,
    Decimal("1.0"),
)

_WILD_EVENT = st.tuples(
    st.lists(st.tuples(st.integers(0, len(_WILD_KEYS) - 1), st.booleans()), max_size=4),
    st.sampled_from(("page_view", "store_purchase", "order_placed", "erase", "ляля")),
    st.integers(0, len(_WILD_TIMES) - 1),
    st.integers(-3, 3),
    st.integers(0, len(_WILD_EVENT_IDS) - 1),
    st.sampled_from(_WILD_LABELS),
    st.sampled_from(_WILD_LABELS),
    st.integers(0, len(_WILD_TOTALS) - 1),
    st.integers(0, len(_WILD_CURRENCIES) - 1),
)


def _build_wild(spec: Spec) -> list[NormalizedEvent]:
    events = []
    for ids, etype, ti, jitter, ei, source, channel, toti, ci in spec:
        first: dict[str, Identifier] = {}
        for k, verified in ids:
            t, value = _WILD_KEYS[k]
            first.setdefault(f"{t}:{value}", Identifier(t, value, verified))  # one Identifier per key
        attrs: dict[str, Any] = {}
        if _WILD_TOTALS[toti] is not _NO_TOTAL:
            attrs["total"] = _WILD_TOTALS[toti]
        if _WILD_CURRENCIES[ci] is not _NO_TOTAL:
            attrs["currency"] = _WILD_CURRENCIES[ci]
        at = min(max(_WILD_TIMES[ti] + jitter * _DAY, -_I64), _I64 - 1)  # orjson stores 64 bits at most
        events.append(
            NormalizedEvent(_WILD_EVENT_IDS[ei], source, channel, etype, at, tuple(first.values()), attrs)
        )
    return events


@settings(max_examples=150, deadline=None, suppress_health_check=_SLOW)
@given(
    spec=st.lists(_WILD_EVENT, min_size=1, max_size=25),
    name=st.sampled_from(_NAMES),
    hot=st.sampled_from([5_000, 1]),
)
def test_odd_values_times_ids_and_totals(spec: Spec, name: str, hot: int) -> None:
    """Control characters, quotes, non-ASCII and colons in values and types, times at 0, before 1970 and
    past the ULID's 48 bits, money as floats, integers, strings, NaN and 1E+40, odd currencies; with a hot
    cache of one, through the packed cold cache too."""
    rules, history = RULE_SETS[name]
    events = _build_wild(spec)
    # a hot cache of one, rotated at every event's flush: a profile seen two events ago is unpacked
    nat_kw = {"cache_profiles": hot} if hot > 1 else {"cache_profiles": 1, "flush_every": 1}
    trace = Trace(_header(name, history=history, native=nat_kw))
    with contextlib.suppress(_PythonRaised):  # the Python core raised, and the native engine did too
        _differential(events, rules, trace, history=history, nat_kw=nat_kw, flushes=range(0, len(events), 3))


@pytest.mark.parametrize("bad", ["verified=1", "verified=None", "at=2**63"])
def test_an_event_the_native_engine_refuses_changes_nothing(bad: str) -> None:
    """`NativeGraph` documents that it takes events as validation makes them (`verified` a bool, times in
    64 signed bits) and that anything else "raises before the event changes any state": after each refused
    event the engine goes on exactly as a Python graph that never saw it. (Python itself links all three.)"""
    events, _ = _build(_random_spec(random.Random(5), 60, erase_weight=8))
    rules, _ = RULE_SETS["shipped"]
    ref = IdentityGraph(MemoryStore(), rules)
    nat_store = MemoryStore()
    nat = _native(nat_store, rules, flush_every=7)
    trace = Trace(f"# rules: shipped; every 15th event followed by one with {bad}")
    for n, ev in enumerate(events):
        _link_both(ref, nat, ev, trace)
        if n % 15 == 14 and ev.identifiers:
            first = ev.identifiers[0]
            if bad == "at=2**63":
                odd = NormalizedEvent(
                    f"bad{n}", "web", "web", "login", _I64, (first, Identifier("phone", f"+7{n}"))
                )
            else:
                flag: Any = 1 if bad == "verified=1" else None
                idents = (Identifier(first.type, first.value, flag), Identifier("phone", f"+7{n}", flag))
                odd = NormalizedEvent(f"bad{n}", "web", "web", "login", ev.occurred_at_ms, idents)
            trace.add(f"g.link({_code(odd)})  # must raise, and change nothing")
            with pytest.raises(Exception):  # noqa: B017 - which exception is the engine's choice
                nat.link(odd)
    _flush_both(ref, nat, nat_store, trace, "at the end")


@settings(max_examples=60, deadline=None, suppress_health_check=_SLOW)
@given(spec=EVENTS, name=st.sampled_from(_NAMES))
def test_a_key_twice_in_one_event_with_both_flags(spec: Spec, name: str) -> None:
    """Validation never hands the core such an event. Python links it when every key is known and in one
    profile (the hot path), and raises TypeError where it sorts the Identifiers: the native engine must link
    the first the same, and must not link the second."""
    rules, history = RULE_SETS[name]
    events, flushes = _build(spec, one_flag_per_key=False)
    trace = Trace(_header(name, history=history))
    with contextlib.suppress(_PythonRaised):  # the Python core raised, and the native engine did too
        _differential(events, rules, trace, history=history, flushes=flushes)
