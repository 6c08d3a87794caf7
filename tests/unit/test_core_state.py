"""ProfileState's storage encoding: the packed row (Python and native codecs byte for byte), and the JSON
forms earlier versions stored still readable."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.core import IdentityGraph, MemoryStore
from streams.core import state as state_module
from streams.core.state import (
    ERASED,
    MERGED,
    ROW_FORMAT,
    ProfileState,
    _pack_row,
    _Packer,
    _unpack_row,
)
from streams.events import Identifier, NormalizedEvent
from tests.native_toolchain import can_build


def _event(eid: str, *keys: str, total: str | None = None) -> NormalizedEvent:
    idents = tuple(Identifier(*k.split(":", 1), verified=k.startswith("customer")) for k in keys)
    attrs: dict[str, object] = {} if total is None else {"total": Decimal(total), "currency": "RUB"}
    return NormalizedEvent(eid, "pos", "store", "store_purchase", 1_000 + int(eid), idents, attrs)


def _profile() -> ProfileState:
    g = IdentityGraph()
    g.link(_event("1", "customer_id:C1", "phone:+7900", total="990.50"))
    g.link(_event("2", "phone:+7900", "email:a@x.ru"))
    g.link(_event("3", "email:b@x.ru", "cookie_id:k1"))
    r = g.link(_event("4", "customer_id:C1", "email:b@x.ru", total="10"))
    assert r.profile_id is not None
    p = g.profile(r.profile_id)
    assert p is not None and len(p.ids) >= 3
    p.apart = ("01AAAAAAAAAAAAAAAAAAAAAAAA",)
    p.merged_from = ("01CCCCCCCCCCCCCCCCCCCCCCCC",)
    p.extra["segment"] = "vip"
    return p


def test_encode_round_trips_every_field() -> None:
    p = _profile()
    q = ProfileState.decode(p.encode())
    assert q.to_dict() == p.to_dict()
    assert q.types == p.types and q.revenue == {"RUB": Decimal("1000.50")}


def test_the_row_is_packed_and_smaller_than_the_json_forms() -> None:
    p = _profile()
    row = p.encode()
    assert row[:1] == ROW_FORMAT
    assert len(row) < 0.6 * len(p.positional_json()) < len(orjson.dumps(p.to_dict()))


def test_positional_json_written_by_earlier_versions_still_decodes() -> None:
    p = _profile()
    assert p.positional_json()[:1] == b"["
    assert ProfileState.decode(p.positional_json()).to_dict() == p.to_dict()


def test_dict_form_written_by_earlier_versions_still_decodes() -> None:
    p = _profile()
    assert ProfileState.decode(orjson.dumps(p.to_dict())).to_dict() == p.to_dict()


def test_tombstones_round_trip() -> None:
    for status, into in ((MERGED, "01AAAAAAAAAAAAAAAAAAAAAAAA"), (ERASED, None)):
        p = ProfileState("01BBBBBBBBBBBBBBBBBBBBBBBB", 5)
        p.status, p.merged_into, p.seq = status, into, 7
        q = ProfileState.decode(p.encode())
        assert q.to_dict() == p.to_dict() and not q.ids and q.apart == ()


def _reopened_on(old_row: Callable[[ProfileState], bytes]) -> None:
    """A graph reopened on a profile row stored by `old_row` reads it, links on, and writes it packed."""
    store = MemoryStore()
    g = IdentityGraph(store)
    pid = g.link(_event("1", "customer_id:C1", "phone:+7900")).profile_id
    g.flush()
    assert pid is not None
    p = g.profile(pid)
    assert p is not None
    store.put(b"p:" + pid.encode(), old_row(p))
    again = IdentityGraph(store)
    assert again.link(_event("2", "phone:+7900")).profile_id == pid
    q = again.profile(pid)
    assert q is not None and q.events == 2
    again.flush()
    row = store.get(b"p:" + pid.encode())
    assert row is not None and row[:1] == ROW_FORMAT and ProfileState.decode(row).events == 2


def test_a_graph_reopened_on_dict_form_rows_reads_them() -> None:
    _reopened_on(lambda p: orjson.dumps(p.to_dict()))  # as stored before the positional form


def test_a_graph_reopened_on_positional_rows_reads_them_and_writes_packed_ones() -> None:
    _reopened_on(ProfileState.positional_json)  # as 0.4.4 stored it


# --- the packed row: any profile, both codecs ---------------------------------------------------------------

_TIMES = st.integers(946_684_800_000, 4_102_444_800_000)  # validation's window, 2000-2100
_TEXT = st.text(min_size=0, max_size=12)  # any Unicode but lone surrogates, which JSON cannot carry
_IDS = st.text("0123456789ABCDEFGHJKMNPQRSTVWXYZ", min_size=1, max_size=26)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=6,
)


@st.composite
def _profiles(draw: Any) -> ProfileState:
    """Profiles as any version stored them: records whose key has no type prefix, verified flags stored as
    integers, neighbour lists empty or of 48-bit codes, origins elsewhere, free `extra` fields, tombstones."""
    p = ProfileState(draw(_IDS), draw(_TIMES))
    p.seq = draw(st.integers(0, 10**6))
    if draw(st.integers(0, 9)) == 0:
        p.status = draw(st.sampled_from([MERGED, ERASED]))
        p.merged_into = draw(st.none() | _IDS)
        return p
    p.first_ms, p.last_ms = sorted(draw(st.lists(_TIMES, min_size=2, max_size=2)))
    p.events, p.orders = draw(st.integers(0, 10**9)), draw(st.integers(0, 10**6))
    for currency in draw(st.lists(st.sampled_from(["RUB", "USD", "EUR", "Ā"]), unique=True, max_size=2)):
        p.revenue[currency] = Decimal(draw(st.integers(-(10**12), 10**12))) / 100
    for slots in (p.channels, p.sources):
        for name in draw(st.lists(_TEXT, unique=True, max_size=4)):
            slots[name] = [draw(st.integers(0, 10**6)), draw(_TIMES)]
    for n in range(draw(st.integers(0, 6))):
        type_ = draw(st.sampled_from(["phone", "email", "cookie_id", "loyalty_card", "x:y", "ф"]))
        key = draw(st.sampled_from([f"{type_}:{n}", f"{n}", f"other:{type_}{n}", f"{type_}{n}:"]))
        first = draw(_TIMES)
        verified = draw(st.booleans() | st.integers(-3, 3))
        nb = draw(st.none() | st.lists(st.integers(0, 2**48 - 1), max_size=4))
        origin = draw(st.just(p.id) | _IDS)
        p.add_identifier(key, [type_, first, draw(_TIMES), draw(_TEXT), verified, draw(_TEXT), origin, nb])
    p.apart = tuple(draw(st.lists(_IDS, max_size=2)))
    p.merged_from = tuple(draw(st.lists(_IDS, max_size=3)))
    p.split_from = draw(st.none() | _IDS)
    p.extra = draw(st.dictionaries(_TEXT, _JSON, max_size=3))
    return p


def _fields(p: ProfileState) -> dict[str, Any]:
    """Every slot, with the verified flag's type: an integer flag must stay an integer."""
    return {
        **p.to_dict(),
        "types": p.types,
        "verified_types": [type(r[4]).__name__ for r in p.ids.values()],
    }


@settings(max_examples=400, deadline=None)
@given(_profiles())
def test_any_profile_round_trips_through_the_python_codec(p: ProfileState) -> None:
    row = _pack_row(p)
    assert row[:1] == ROW_FORMAT
    assert _fields(_unpack_row(row)) == _fields(p)


def _native_module() -> Any:
    """The compiled module: required where `make setup` can build it (tests/native_toolchain.py)."""
    if can_build():
        import omnistitch_native

        return omnistitch_native
    return pytest.importorskip("omnistitch_native", reason="no cargo >= 1.85: the native module is not built")


@settings(max_examples=400, deadline=None)
@given(_profiles())
def test_the_native_codec_writes_and_reads_the_python_codecs_bytes(p: ProfileState) -> None:
    module = _native_module()
    row = _pack_row(p)
    assert module.profile_row(p) == row
    assert module.profile_json(row) == p.positional_json()
    assert _fields(ProfileState.decode(row)) == _fields(p)


@pytest.mark.parametrize("codec", ["python", "native"])
def test_a_damaged_row_raises_value_error(codec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if codec == "python":
        monkeypatch.setattr(state_module, "_row_to_json", None)
    else:
        _native_module()
    p = _profile()
    p.revenue = {"RUB": Decimal("1.5")}
    row = p.encode()
    assert row.endswith(b'\x12{"segment":"vip"}') and b"\x031.5" in row
    overlong = _Packer()  # a seq of ten varint bytes whose last holds more than bit 64
    overlong.blob(b"01A")
    overlong.name(MERGED)
    overlong.out += b"\xff" * 9 + b"\x7f\x00"
    for damaged in (
        row[:-1],
        row[: len(row) // 2],
        row + b"\x00",
        ROW_FORMAT + b"\x05ab",
        bytes(overlong.out),
        row.replace(b"\x031.5", b"\x031x5"),  # revenue that is no decimal
        row[: -len(b'{"segment":"vip"}') - 1] + b"\x04[1]",  # extra fields that are no JSON object
    ):
        with pytest.raises(ValueError):
            ProfileState.decode(damaged)
        if codec == "native" and b"1x5" not in damaged:  # the Rust codec refuses it too (no fallback)
            with pytest.raises(ValueError):
                _native_module().profile_json(damaged)
    assert _fields(ProfileState.decode(row)) == _fields(p)


@pytest.mark.parametrize("codec", ["python", "native"])
def test_integers_beyond_64_bits_are_refused_not_wrapped(codec: str) -> None:
    p = _profile()
    p.events = 2**63
    pack = _pack_row if codec == "python" else _native_module().profile_row
    with pytest.raises(OverflowError):
        pack(p)


def test_extra_fields_nested_deeper_than_the_native_parser_reads_still_round_trip() -> None:
    p = _profile()
    deep: Any = "bottom"
    for _ in range(200):  # serde_json stops at 128 levels; orjson writes up to 254
        deep = [deep]
    p.extra = {"deep": deep}
    assert _fields(ProfileState.decode(p.encode())) == _fields(p)
